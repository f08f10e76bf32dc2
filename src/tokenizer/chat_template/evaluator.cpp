// The chat-template evaluator (see evaluator.h): statements append text, expressions produce
// Values; filters, tests and Python operations are delegated to builtins.h and value.h.
// Trade-off: a plain recursive tree walk (no bytecode) bounded by a recursion counter and a
// macro call depth, so a hostile template fails with an error instead of overflowing the stack;
// the bulky cases are kept out of line so each recursion level's frame stays small.
#include "tokenizer/chat_template/evaluator.h"

#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/chat_template/builtins.h"

namespace ftune::tok::jinja {

ScopePtr child_scope(const ScopePtr& parent) {
  auto s = std::make_shared<Scope>();
  s->parent = parent;
  return s;
}

// Entering a frame: the names analyze_scopes() found start undefined there.
ScopePtr frame_scope(const ScopePtr& parent, const std::vector<std::string>& undef) {
  auto s = child_scope(parent);
  for (const auto& n : undef) s->vars[n] = Value::undefined("'" + n + "' is undefined");
  return s;
}

namespace {

enum class Flow { kNormal, kBreak, kContinue };

// Walks the AST. Scoping follows jinja2: a for-loop iteration, macro call, {% with %} and
// {% set %}...{% endset %} body get a child scope (so `set` inside a loop does not leak out,
// which is why templates use namespace()); if-blocks do not.
class Interp {
 public:
  ~Interp() {
    // Macros hold their defining scope, which holds the macro: break the cycles.
    for (auto& s : macro_scopes_) s->vars.clear();
  }

  Flow exec(const Body& body, const ScopePtr& scope, std::string& out) {
    for (const auto& st : body) {
      const Flow f = exec_stmt(*st, scope, out);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

 private:
  // Bounds the evaluator's recursion (nested blocks, expressions, macro calls) so that a
  // pathological template fails with an error instead of overflowing the stack.
  struct RecursionGuard {
    RecursionGuard(Interp& in, int line) : in_(in) {
      if (++in_.recursion_ > kMaxRecursion) fail_line(line, "maximum recursion depth exceeded");
    }
    ~RecursionGuard() { --in_.recursion_; }
    Interp& in_;
  };

  // Counts one step of the render's kMaxSteps (a statement run or a loop iteration).
  void step(int line) {
    if (++steps_ > kMaxSteps) fail_line(line, "template too expensive (over 1,000,000 steps)");
  }

  Flow exec_stmt(const Stmt& s, const ScopePtr& scope, std::string& out) {
    RecursionGuard guard(*this, s.line);
    step(s.line);
    const Flow f = exec_stmt_unbounded(s, scope, out);
    if (out.size() > kMaxStringBytes) fail_line(s.line, "output too large (over 64 MiB)");
    return f;
  }

  Flow exec_stmt_unbounded(const Stmt& s, const ScopePtr& scope, std::string& out) {
    switch (s.kind) {
      case SK::kText: out += s.text; return Flow::kNormal;
      case SK::kPrint: exec_print(s, scope, out); return Flow::kNormal;
      case SK::kIf:
        for (const auto& [cond, body] : s.branches) {
          if (truthy(eval(*cond, scope))) return exec(body, scope, out);
        }
        return exec(s.else_body, scope, out);
      case SK::kFor: exec_for(s, scope, out); return Flow::kNormal;
      case SK::kSet: exec_set(s, scope); return Flow::kNormal;
      case SK::kMacro: scope->vars[s.text] = make_macro(s, scope); return Flow::kNormal;
      case SK::kBreak: return Flow::kBreak;
      case SK::kContinue: return Flow::kContinue;
      case SK::kSetBlock:
      case SK::kFilterBlock:
      case SK::kScope: exec_block(s, scope, out); return Flow::kNormal;
    }
    return Flow::kNormal;
  }

  [[gnu::noinline]] void exec_block(const Stmt& s, const ScopePtr& scope, std::string& out) {
    auto inner = frame_scope(scope, s.undef);
    if (s.kind == SK::kScope) {
      for (const auto& [name, expr] : s.params) inner->vars[name] = eval(*expr, scope);
      exec(s.body, inner, out);
      return;
    }
    std::string text;
    exec(s.body, inner, text);
    Value v = Value::str(std::move(text));
    if (s.kind == SK::kFilterBlock) {
      out += py_str(eval_with_input(*s.expr, scope, v));
      return;
    }
    if (s.expr) v = eval_with_input(*s.expr, scope, v);
    assign(s, std::move(v), *scope);
  }

  [[gnu::noinline]] void exec_print(const Stmt& s, const ScopePtr& scope, std::string& out) {
    out += py_str(eval(*s.expr, scope));
  }
  [[gnu::noinline]] void exec_set(const Stmt& s, const ScopePtr& scope) { assign(s, eval(*s.expr, scope), *scope); }

  void bind_targets(const Stmt& s, const Value& v, Scope& scope) {
    if (!s.unpack) {
      scope.vars[s.targets[0]] = v;
      return;
    }
    const ValueList items = iterate(v, s.line);
    if (items.size() != s.targets.size()) {
      fail_line(s.line, items.size() > s.targets.size()
                            ? "too many values to unpack (expected " + std::to_string(s.targets.size()) + ")"
                            : "not enough values to unpack (expected " + std::to_string(s.targets.size()) +
                                  ", got " + std::to_string(items.size()) + ")");
    }
    for (size_t k = 0; k < items.size(); ++k) scope.vars[s.targets[k]] = items[k];
  }

  void assign(const Stmt& s, Value v, Scope& scope) {
    if (s.text.empty()) {
      bind_targets(s, v, scope);
      return;
    }
    const Value* ns = scope.find(s.targets[0]);
    if (!ns || ns->type != Value::Type::kObject || !ns->obj->assignable) {
      fail_line(s.line, "cannot assign attribute on non-namespace object");
    }
    ns->obj->set(s.text, std::move(v));
  }

  [[gnu::noinline]] void exec_for(const Stmt& s, const ScopePtr& scope, std::string& out) {
    const Value seq = eval(*s.expr, scope);
    ValueList items = iterate(seq, s.line);
    if (s.cond) {
      ValueList kept;
      for (auto& item : items) {
        step(s.line);
        auto inner = child_scope(scope);
        bind_targets(s, item, *inner);
        if (truthy(eval(*s.cond, inner))) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      exec(s.else_body, frame_scope(scope, s.undef_else), out);
      return;
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      step(s.line);
      auto inner = frame_scope(scope, s.undef);
      bind_targets(s, items[k], *inner);
      inner->vars["loop"] = make_loop(items, k);
      if (exec(s.body, inner, out) == Flow::kBreak) break;
    }
  }

  [[gnu::noinline]] static Value make_loop(const ValueList& items, int64_t k) {
    const auto n = static_cast<int64_t>(items.size());
    auto loop = std::make_shared<Object>();
    loop->type_name = "LoopContext";
    loop->attrs = {
          {"index", Value::integer(k + 1)},
          {"index0", Value::integer(k)},
          {"revindex", Value::integer(n - k)},
          {"revindex0", Value::integer(n - k - 1)},
          {"first", Value::boolean(k == 0)},
          {"last", Value::boolean(k == n - 1)},
          {"length", Value::integer(n)},
          {"depth", Value::integer(1)},
          {"depth0", Value::integer(0)},
          {"previtem", k > 0 ? items[k - 1] : Value::undefined("there is no previous item")},
          {"nextitem", k + 1 < n ? items[k + 1] : Value::undefined("there is no next item")},
          {"cycle", Value::function("cycle", [k](CallArgs& a) -> Value {
             if (a.pos.empty()) fail_line(a.line, "no items for cycling given");
             return a.pos[static_cast<size_t>(k) % a.pos.size()];
           })},
      };
    Value lv;
    lv.type = Value::Type::kObject;
    lv.obj = loop;
    return lv;
  }

  Value make_macro(const Stmt& s, const ScopePtr& scope) {
    macro_scopes_.push_back(scope);
    const Stmt* def = &s;
    std::weak_ptr<Scope> weak = scope;
    return Value::function(s.text, [this, def, weak](CallArgs& a) -> Value {
      auto parent = weak.lock();
      if (!parent) fail_line(a.line, "macro '" + def->text + "' called after its scope ended");
      if (a.pos.size() > def->params.size()) {
        fail_line(a.line, "macro '" + def->text + "' takes not more than " + std::to_string(def->params.size()) + " argument(s)");
      }
      if (call_depth_ >= kMaxCallDepth) fail_line(a.line, "maximum recursion depth exceeded in macro '" + def->text + "'");
      ++call_depth_;
      struct Leave {
        int& d;
        ~Leave() { --d; }
      } leave{call_depth_};
      auto inner = frame_scope(parent, def->undef);
      for (const auto& kv : a.kw) {
        const bool known = std::any_of(def->params.begin(), def->params.end(), [&](const auto& p) { return p.first == kv.first; });
        if (!known) fail_line(a.line, "macro '" + def->text + "' takes no keyword argument '" + kv.first + "'");
      }
      for (size_t k = 0; k < def->params.size(); ++k) {
        const auto& [name, default_expr] = def->params[k];
        if (const Value* v = a.get(k, name.c_str())) {
          inner->vars[name] = *v;
        } else if (default_expr) {
          inner->vars[name] = eval(*default_expr, inner);
        } else {
          inner->vars[name] = Value::undefined("parameter '" + name + "' was not provided");
        }
      }
      std::string out;
      exec(def->body, inner, out);
      return Value::str(std::move(out));
    });
  }

  // Evaluates a filter chain whose innermost target is the rendered body of a block.
  Value eval_with_input(const Expr& e, const ScopePtr& scope, const Value& input) {
    const Value* saved = block_input_;
    block_input_ = &input;
    Value v = eval(e, scope);
    block_input_ = saved;
    return v;
  }

  CallArgs eval_args(const Expr& e, const ScopePtr& scope) {
    CallArgs a;
    a.line = e.line;
    for (const auto& x : e.args) a.pos.push_back(eval(*x, scope));
    for (const auto& [k, x] : e.kwargs) a.kw.emplace_back(k, eval(*x, scope));
    return a;
  }

  Value call(const Value& f, CallArgs& a) {
    if (f.type == Value::Type::kFunction) return (*f.fn)(a);
    if (f.is_undefined()) undefined_error(f, a.line);
    fail_line(a.line, "'" + py_type_name(f) + "' object is not callable");
  }

 public:
  Value eval(const Expr& e, const ScopePtr& scope) {
    RecursionGuard guard(*this, e.line);
    switch (e.kind) {
      case EK::kLiteral: return e.value;
      case EK::kName: {
        if (const Value* v = scope->find(e.name)) return *v;
        return Value::undefined("'" + e.name + "' is undefined");
      }
      case EK::kList:
      case EK::kTuple: {
        ValueList items;
        for (const auto& x : e.args) items.push_back(eval(*x, scope));
        return Value::make_list(std::move(items), e.kind == EK::kTuple);
      }
      case EK::kDict: {
        ValueDict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], scope);
          require_hashable(key, e.line);
          dict_set(d, std::move(key), eval(*e.args[k + 1], scope));
        }
        return Value::make_dict(std::move(d));
      }
      case EK::kAttr: return get_attr(eval(*e.a, scope), e.name, e.line);
      case EK::kItem: {
        const Value obj = eval(*e.a, scope);
        if (e.b->kind == EK::kSlice) {
          const Expr& sl = *e.b;
          const Value absent = Value::undefined("<absent>");
          return get_slice(obj, sl.a ? eval(*sl.a, scope) : absent, sl.b ? eval(*sl.b, scope) : absent,
                           sl.c ? eval(*sl.c, scope) : absent, e.line);
        }
        return get_item(obj, eval(*e.b, scope), e.line);
      }
      case EK::kSlice: fail_line(e.line, "slice outside a subscript");
      case EK::kUnary: {
        const Value v = eval(*e.a, scope);
        if (e.name == "not") return Value::boolean(!truthy(v));
        if (v.is_undefined()) undefined_error(v, e.line);
        if (v.is_int_like()) return Value::integer(e.name == "-" ? -v.i : v.i);
        if (v.type == Value::Type::kFloat) return Value::real(e.name == "-" ? -v.f : v.f);
        fail_line(e.line, "bad operand type for unary " + e.name + ": '" + py_type_name(v) + "'");
      }
      case EK::kBinary: return binary_op(e.name, eval(*e.a, scope), eval(*e.b, scope), e.line);
      case EK::kAnd: {
        Value l = eval(*e.a, scope);
        return truthy(l) ? eval(*e.b, scope) : l;
      }
      case EK::kOr: {
        Value l = eval(*e.a, scope);
        return truthy(l) ? l : eval(*e.b, scope);
      }
      case EK::kCompare: {
        Value left = eval(*e.a, scope);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k], scope);
          if (!compare(e.ops[k], left, right, e.line)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case EK::kCond: {
        if (truthy(eval(*e.b, scope))) return eval(*e.a, scope);
        if (e.c) return eval(*e.c, scope);
        return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                                " evaluated to false and no else section was defined.");
      }
      case EK::kCall: {
        const Value f = eval(*e.a, scope);
        CallArgs a = eval_args(e, scope);
        return call(f, a);
      }
      case EK::kFilter: {
        Value target = e.a ? eval(*e.a, scope) : (block_input_ ? *block_input_ : Value());
        CallArgs a = eval_args(e, scope);
        return apply_filter(e.name, target, a);
      }
      case EK::kTest: {
        const Value target = eval(*e.a, scope);
        CallArgs a = eval_args(e, scope);
        return Value::boolean(apply_test(e.name, target, a) != e.negated);
      }
    }
    fail_line(e.line, "bad expression");
  }

 private:

  static constexpr int kMaxCallDepth = 100;
  static constexpr int kMaxRecursion = 1500;
  int recursion_ = 0;
  const Value* block_input_ = nullptr;
  std::vector<ScopePtr> macro_scopes_;
  int call_depth_ = 0;
  int64_t steps_ = 0;  // see step()
};

}  // namespace

void execute(const Body& body, const ScopePtr& scope, std::string& out) {
  Interp interp;
  interp.exec(body, scope, out);
}

}  // namespace ftune::tok::jinja
