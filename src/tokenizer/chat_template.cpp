// render_chat_template(): a Jinja2-subset interpreter for HF chat templates following jinja2 3.1
// as transformers configures it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
// loopcontrols, tojson as json.dumps with ensure_ascii=False, raise_exception, strftime_now).
// This file converts the JSON context and caches the parsed template; the interpreter lives in
// chat_template/: text (Python str on UTF-8) -> value, operators, methods (the Value type and
// Python semantics) -> lexer -> parser, scopes (AST) -> filters, globals (builtins) ->
// evaluator. Trade-off: our own interpreter and Value type (no C++ Jinja in Debian), so
// rendering matches transformers byte for byte, tested against it in test_chat_template.py.
#include "tokenizer/chat_template.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/chat_template/builtins.h"
#include "tokenizer/chat_template/evaluator.h"
#include "tokenizer/chat_template/parser.h"
#include "tokenizer/chat_template/value.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {
namespace jinja {
namespace {

// `path` names the value in errors ("messages[1].content").
Value from_json(const nlohmann::ordered_json& j, const std::string& path) {
  auto checked = [&](const std::string& s, const std::string& where) -> const std::string& {
    if (const auto bad = utf8_invalid_at(s)) {
      fail("chat template: ", where, ": invalid UTF-8 at byte ", *bad);
    }
    return s;
  };
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      const auto u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::real(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case nlohmann::json::value_t::number_float: return Value::real(j.get<double>());
    case nlohmann::json::value_t::string:
      return Value::str(checked(j.get_ref<const std::string&>(), path));
    case nlohmann::json::value_t::array: {
      ValueList items;
      for (size_t i = 0; i < j.size(); ++i) {
        items.push_back(from_json(j[i], path + "[" + std::to_string(i) + "]"));
      }
      return Value::make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      ValueDict d;
      for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string child = path.empty() ? it.key() : path + "." + it.key();
        checked(it.key(), (path.empty() ? std::string("(context)") : path) + " (a key)");
        d.emplace_back(Value::str(it.key()), from_json(it.value(), child));
      }
      return Value::make_dict(std::move(d));
    }
    default: return Value::none();
  }
}

// A parsed template. Rendering a dataset calls us once per example with the same source, so each
// thread keeps the last one it parsed (the AST is immutable once analyzed).
struct Program {
  std::string source;
  Body body;
  std::vector<std::string> root_undef;
};

std::shared_ptr<const Program> compile(const std::string& source) {
  thread_local std::shared_ptr<const Program> last;
  if (last && last->source == source) return last;
  if (const auto bad = utf8_invalid_at(source)) {
    const auto line = 1 + std::count(source.begin(), source.begin() + static_cast<std::ptrdiff_t>(*bad), '\n');
    fail_line(static_cast<int>(line), "invalid UTF-8 at byte " + std::to_string(*bad));
  }
  auto p = std::make_shared<Program>();
  p->source = source;
  p->body = parse(tokenize(source));
  p->root_undef = analyze_scopes(p->body);
  last = p;
  return p;
}

std::string render(const std::string& source, const Value& context) {
  if (!context.is_dict()) fail("chat template: context must be a JSON object");
  const auto program = compile(source);
  auto vars = child_scope(make_globals());
  for (const auto& [k, v] : *context.dict) vars->vars[k.s] = v;
  auto root = frame_scope(vars, program->root_undef);
  std::string out;
  execute(program->body, root, out);
  return out;
}

}  // namespace
}  // namespace jinja

std::string render_chat_template(const std::string& source, const nlohmann::ordered_json& context) {
  return jinja::render(source, jinja::from_json(context, ""));
}

}  // namespace ftune::tok
