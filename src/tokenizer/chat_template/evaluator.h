// The chat-template evaluator: walks the AST (ast.h) in a chain of scopes and appends the
// rendered text. Scoping follows jinja2: a for-loop iteration, macro call, {% with %} and
// block-set/filter body get a child scope (so `set` inside a loop does not leak out, which is
// why templates use namespace()); if-blocks do not. Trade-off: names are looked up dynamically
// through the chain rather than resolved at compile time as jinja2 does; the scope pass
// (analyze_scopes) covers the one case where that would differ.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/chat_template/ast.h"

namespace ftune::tok::jinja {

// One level of variables; `parent` leads to the enclosing frame and finally to the globals.
struct Scope {
  std::shared_ptr<Scope> parent;
  std::unordered_map<std::string, Value> vars;

  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

ScopePtr child_scope(const ScopePtr& parent);
// Entering a frame: the names analyze_scopes() found start undefined there.
ScopePtr frame_scope(const ScopePtr& parent, const std::vector<std::string>& undef);

// Renders `body` in `scope`, appending to `out`; throws "chat template: line N: ..." on a
// runtime error (undefined value used, type error, raise_exception, recursion too deep).
void execute(const Body& body, const ScopePtr& scope, std::string& out);

}  // namespace ftune::tok::jinja
