// The chat-template scope pass (see parser.h): finds, per frame (template, for body, macro,
// with/set/filter block), the names jinja2 binds to undefined on entry, and stores them in the
// AST for the evaluator. Trade-off: the evaluator resolves names dynamically through nested
// scopes, which agrees with jinja2's compile-time resolution except for this one case, so only
// this case is computed statically instead of porting jinja2's whole idtracking.
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tokenizer/chat_template/parser.h"

namespace ftune::tok::jinja {

namespace {

// jinja2 resolves names at compile time (idtracking.py): each frame (the template, a for body,
// a macro...) gives every name it mentions a load action at frame entry: parameter, resolve from
// the context, alias of the enclosing frame's variable, or undefined. The evaluator here looks
// names up dynamically through nested scopes, which agrees with all of that except "undefined":
// a name whose first mention in a frame is an assignment (outside if-branches) and that no
// enclosing frame knows starts undefined, even if the context has it, e.g. a for body that reads
// `x` before a later top-level {% set x %}. This pass finds those names per frame so the
// evaluator can bind them to undefined when it enters the frame.
class Symbols {
 public:
  explicit Symbols(const Symbols* parent) : parent_(parent) {}

  bool find(const std::string& n) const {
    for (const Symbols* s = this; s; s = s->parent_) {
      if (s->refs_.count(n)) return true;
    }
    return false;
  }
  void load(const std::string& n) {
    if (!find(n)) refs_[n] = Load::kResolve;
  }
  void store(const std::string& n) {
    stores_.insert(n);
    if (!refs_.count(n)) refs_[n] = (parent_ && parent_->find(n)) ? Load::kAlias : Load::kUndefined;
  }
  void param(const std::string& n) {
    stores_.insert(n);
    refs_[n] = Load::kParam;
  }
  // Merges the symbols of if/elif/else branches: a name assigned in some branch resolves from
  // the context (or aliases the enclosing frame) instead of starting undefined.
  void branch_update(const std::vector<const Symbols*>& branches) {
    std::set<std::string> stored;
    for (const Symbols* b : branches) stored.insert(b->stores_.begin(), b->stores_.end());
    for (const auto& n : stores_) stored.erase(n);
    for (const Symbols* b : branches) {
      for (const auto& [n, l] : b->refs_) refs_[n] = l;
      stores_.insert(b->stores_.begin(), b->stores_.end());
    }
    for (const auto& n : stored) refs_[n] = (parent_ && parent_->find(n)) ? Load::kAlias : Load::kResolve;
  }
  std::vector<std::string> undefined_names() const {
    std::vector<std::string> out;
    for (const auto& [n, l] : refs_) {
      if (l == Load::kUndefined) out.push_back(n);
    }
    return out;
  }

 private:
  enum class Load { kParam, kResolve, kAlias, kUndefined };
  const Symbols* parent_;
  std::map<std::string, Load> refs_;
  std::set<std::string> stores_;
};

void sym_expr(const Expr* e, Symbols& s) {
  if (!e) return;
  if (e->kind == EK::kName) {
    s.load(e->name);
    return;
  }
  sym_expr(e->a.get(), s);
  sym_expr(e->b.get(), s);
  sym_expr(e->c.get(), s);
  for (const auto& x : e->args) sym_expr(x.get(), s);
  for (const auto& kv : e->kwargs) sym_expr(kv.second.get(), s);
}

void sym_stmt(const Stmt& st, Symbols& s);
void sym_body(const Body& body, Symbols& s) {
  for (const auto& st : body) sym_stmt(*st, s);
}

void sym_targets(const Stmt& st, Symbols& s) {
  if (!st.text.empty()) {
    s.load(st.targets[0]);  // {% set ns.attr = ... %} reads ns
  } else {
    for (const auto& n : st.targets) s.store(n);
  }
}

// What a frame sees of one statement at its own level (jinja2's FrameSymbolVisitor): nested
// frames contribute only the expressions evaluated in the enclosing frame.
void sym_stmt(const Stmt& st, Symbols& s) {
  switch (st.kind) {
    case SK::kPrint: sym_expr(st.expr.get(), s); break;
    case SK::kIf: {
      sym_expr(st.branches[0].first.get(), s);
      Symbols body = s;
      sym_body(st.branches[0].second, body);
      Symbols elifs = s;
      for (size_t k = 1; k < st.branches.size(); ++k) {
        sym_expr(st.branches[k].first.get(), elifs);
        Symbols b = elifs;
        sym_body(st.branches[k].second, b);
        elifs.branch_update({&b});
      }
      Symbols els = s;
      sym_body(st.else_body, els);
      s.branch_update({&body, &elifs, &els});
      break;
    }
    case SK::kFor: sym_expr(st.expr.get(), s); break;
    case SK::kSet:
      sym_expr(st.expr.get(), s);
      sym_targets(st, s);
      break;
    case SK::kSetBlock: sym_targets(st, s); break;
    case SK::kMacro: s.store(st.text); break;
    case SK::kFilterBlock: sym_expr(st.expr.get(), s); break;
    case SK::kScope:
      for (const auto& p : st.params) sym_expr(p.second.get(), s);
      break;
    default: break;
  }
}

void analyze_frames_in(Body& body, const Symbols& frame);

// Analyzes the frames that `st` opens, as children of `frame`.
void analyze_stmt_frames(Stmt& st, const Symbols& frame) {
  switch (st.kind) {
    case SK::kIf:
      for (auto& br : st.branches) analyze_frames_in(br.second, frame);
      analyze_frames_in(st.else_body, frame);
      return;
    case SK::kFor: {
      Symbols body(&frame);
      body.param("loop");
      for (const auto& n : st.targets) body.param(n);
      sym_body(st.body, body);
      st.undef = body.undefined_names();
      analyze_frames_in(st.body, body);
      Symbols els(&frame);
      sym_body(st.else_body, els);
      st.undef_else = els.undefined_names();
      analyze_frames_in(st.else_body, els);
      return;
    }
    case SK::kMacro:
    case SK::kScope:
    case SK::kSetBlock:
    case SK::kFilterBlock: {
      Symbols inner(&frame);
      for (const auto& p : st.params) inner.param(p.first);
      if (st.kind == SK::kMacro) {
        for (const auto& p : st.params) sym_expr(p.second.get(), inner);
      }
      sym_body(st.body, inner);
      if (st.kind == SK::kFilterBlock) sym_expr(st.expr.get(), inner);
      st.undef = inner.undefined_names();
      analyze_frames_in(st.body, inner);
      return;
    }
    default: return;
  }
}

void analyze_frames_in(Body& body, const Symbols& frame) {
  for (auto& st : body) analyze_stmt_frames(*st, frame);
}

}  // namespace

// Returns the names that start undefined at the top level; fills Stmt::undef / undef_else.
std::vector<std::string> analyze_scopes(Body& body) {
  Symbols root(nullptr);
  sym_body(body, root);
  analyze_frames_in(body, root);
  return root.undefined_names();
}

}  // namespace ftune::tok::jinja
