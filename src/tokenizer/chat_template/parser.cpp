// The chat-template parser (see parser.h): recursive descent over the lexer's tokens, building
// ast.h nodes for {% for/if/set/macro/filter/with/generation/break/continue %} and expressions.
// Trade-off: it follows jinja2's parser.py rule for rule (precedence, tuples, implicit test
// arguments, error texts) rather than a grammar generator, and bounds both nesting depth and
// expression length so the evaluator's recursion stays within the stack.
#include "tokenizer/chat_template/parser.h"

#include <algorithm>
#include <iterator>
#include <string_view>
#include <utility>

#include "tokenizer/chat_template/builtins.h"

namespace ftune::tok::jinja {

namespace {

// Recursive descent with jinja2's grammar and precedence (parser.py): condexpr < or < and <
// not < compare < + - < ~ < * / // % < ** < unary < postfix/filter/test.
class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  Body parse() { return parse_body({}); }

 private:
  const Token& cur() const { return t_[p_]; }
  const Token& look() const { return t_[std::min(p_ + 1, t_.size() - 1)]; }
  void advance() {
    if (p_ + 1 < t_.size()) ++p_;
  }
  bool is_op(std::string_view op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool is_name(std::string_view n) const { return cur().type == Tok::kName && cur().text == n; }
  bool skip_op(std::string_view op) {
    if (!is_op(op)) return false;
    advance();
    return true;
  }
  bool skip_name(std::string_view n) {
    if (!is_name(n)) return false;
    advance();
    return true;
  }
  [[noreturn]] void error(const std::string& msg) const { fail_line(cur().line, msg); }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::kData: return "template data";
      case Tok::kVarBegin: return "begin of print statement";
      case Tok::kVarEnd: return "end of print statement";
      case Tok::kBlockBegin: return "begin of statement block";
      case Tok::kBlockEnd: return "end of statement block";
      case Tok::kEof: return "end of template";
      case Tok::kString: return "string";
      default: return t.text;
    }
  }
  void expect_op(std::string_view op) {
    if (!skip_op(op)) error("expected '" + std::string(op) + "', got '" + describe(cur()) + "'");
  }
  std::string expect_name() {
    if (cur().type != Tok::kName) error("expected name, got '" + describe(cur()) + "'");
    std::string s = cur().text;
    advance();
    return s;
  }
  void expect_name(std::string_view n) {
    if (!skip_name(n)) error("expected '" + std::string(n) + "', got '" + describe(cur()) + "'");
  }
  void expect_block_end() {
    if (cur().type != Tok::kBlockEnd) error("expected end of statement block, got '" + describe(cur()) + "'");
    advance();
  }

  Body parse_body(const std::vector<std::string>& ends) {
    Body body;
    while (true) {
      const Token& t = cur();
      switch (t.type) {
        case Tok::kData: {
          auto s = make_stmt(SK::kText, t.line);
          s->text = t.text;
          body.push_back(std::move(s));
          advance();
          break;
        }
        case Tok::kVarBegin: {
          auto s = make_stmt(SK::kPrint, t.line);
          advance();
          chain_ = 0;
          s->expr = parse_tuple(true, {}, false);
          if (cur().type != Tok::kVarEnd) error("expected end of print statement, got '" + describe(cur()) + "'");
          advance();
          body.push_back(std::move(s));
          break;
        }
        case Tok::kBlockBegin: {
          advance();
          if (cur().type == Tok::kName && std::find(ends.begin(), ends.end(), cur().text) != ends.end()) {
            return body;
          }
          body.push_back(parse_statement());
          break;
        }
        case Tok::kEof: {
          if (!ends.empty()) {
            std::string want;
            for (const auto& e : ends) want += (want.empty() ? "'" : " or '") + e + "'";
            error("Unexpected end of template. Jinja was looking for the following tags: " + want + ".");
          }
          return body;
        }
        default: error("unexpected '" + describe(t) + "'");
      }
    }
  }

  StmtPtr parse_statement() {
    DepthGuard guard(*this);
    chain_ = 0;
    if (cur().type != Tok::kName) error("tag name expected");
    const std::string tag = cur().text;
    const int line = cur().line;
    if (tag == "for") return parse_for();
    if (tag == "if") return parse_if();
    if (tag == "set") return parse_set();
    if (tag == "macro") return parse_macro();
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) error("'" + tag + "' outside loop");
      advance();
      expect_block_end();
      return make_stmt(tag == "break" ? SK::kBreak : SK::kContinue, line);
    }
    if (tag == "print") {
      advance();
      auto s = make_stmt(SK::kPrint, line);
      s->expr = parse_tuple(true, {}, false);
      expect_block_end();
      return s;
    }
    if (tag == "filter") {
      advance();
      auto s = make_stmt(SK::kFilterBlock, line);
      s->expr = parse_filter(nullptr, true);
      expect_block_end();
      s->body = parse_body({"endfilter"});
      advance();
      expect_block_end();
      return s;
    }
    if (tag == "with") {
      advance();
      auto s = make_stmt(SK::kScope, line);
      while (cur().type != Tok::kBlockEnd) {
        if (!s->params.empty()) expect_op(",");
        std::string name = expect_name();
        expect_op("=");
        s->params.emplace_back(std::move(name), parse_expression(true));
      }
      expect_block_end();
      s->body = parse_body({"endwith"});
      advance();
      expect_block_end();
      return s;
    }
    if (tag == "generation") {  // transformers' AssistantTracker: renders its body unchanged
      advance();
      expect_block_end();
      auto s = make_stmt(SK::kScope, line);
      s->body = parse_body({"endgeneration"});
      advance();
      expect_block_end();
      return s;
    }
    static const char* kUnsupported[] = {"block", "extends", "include", "import", "from", "call", "autoescape"};
    if (std::find(std::begin(kUnsupported), std::end(kUnsupported), tag) != std::end(kUnsupported)) {
      error("the '" + tag + "' tag is not supported");
    }
    error("Encountered unknown tag '" + tag + "'.");
  }

  // `a`, `a, b`, `(a, b)`: names assigned by for / set.
  void parse_targets(Stmt& s) {
    const bool paren = skip_op("(");
    while (true) {
      s.targets.push_back(expect_name());
      if (!skip_op(",")) break;
      s.unpack = true;
      if (cur().type != Tok::kName || is_name("in")) break;
    }
    if (paren) expect_op(")");
  }

  StmtPtr parse_for() {
    auto s = make_stmt(SK::kFor, cur().line);
    advance();
    parse_targets(*s);
    expect_name("in");
    s->expr = parse_tuple(false, {"recursive"}, false);
    if (skip_name("if")) s->cond = parse_expression(true);
    if (is_name("recursive")) error("recursive for loops are not supported");
    expect_block_end();
    ++loop_depth_;
    s->body = parse_body({"endfor", "else"});
    --loop_depth_;
    if (skip_name("else")) {
      expect_block_end();
      s->else_body = parse_body({"endfor"});
    }
    expect_name("endfor");
    expect_block_end();
    return s;
  }

  StmtPtr parse_if() {
    auto s = make_stmt(SK::kIf, cur().line);
    advance();
    while (true) {
      ExprPtr cond = parse_tuple(false, {}, false);
      expect_block_end();
      Body body = parse_body({"elif", "else", "endif"});
      s->branches.emplace_back(std::move(cond), std::move(body));
      if (skip_name("elif")) continue;
      if (skip_name("else")) {
        expect_block_end();
        s->else_body = parse_body({"endif"});
      }
      expect_name("endif");
      expect_block_end();
      return s;
    }
  }

  StmtPtr parse_set() {
    auto s = make_stmt(SK::kSet, cur().line);
    advance();
    if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == ".") {
      s->targets.push_back(expect_name());
      advance();
      s->text = expect_name();
    } else {
      parse_targets(*s);
    }
    if (skip_op("=")) {
      s->expr = parse_tuple(true, {}, false);
      expect_block_end();
      return s;
    }
    s->kind = SK::kSetBlock;
    if (is_op("|")) s->expr = parse_filter(nullptr, false);
    expect_block_end();
    s->body = parse_body({"endset"});
    advance();
    expect_block_end();
    return s;
  }

  StmtPtr parse_macro() {
    auto s = make_stmt(SK::kMacro, cur().line);
    advance();
    s->text = expect_name();
    expect_op("(");
    bool defaults = false;
    while (!is_op(")")) {
      if (!s->params.empty()) expect_op(",");
      std::string name = expect_name();
      ExprPtr def;
      if (skip_op("=")) {
        def = parse_expression(true);
        defaults = true;
      } else if (defaults) {
        error("non-default argument follows default argument");
      }
      s->params.emplace_back(std::move(name), std::move(def));
    }
    expect_op(")");
    expect_block_end();
    const int saved_depth = loop_depth_;
    loop_depth_ = 0;
    s->body = parse_body({"endmacro"});
    loop_depth_ = saved_depth;
    advance();
    expect_block_end();
    return s;
  }

  // ---- expressions
  bool is_tuple_end(const std::vector<std::string>& extra_end) const {
    if (cur().type == Tok::kVarEnd || cur().type == Tok::kBlockEnd || is_op(")")) return true;
    return cur().type == Tok::kName &&
           std::find(extra_end.begin(), extra_end.end(), cur().text) != extra_end.end();
  }

  ExprPtr parse_tuple(bool with_condexpr, const std::vector<std::string>& extra_end, bool explicit_parens) {
    const int line = cur().line;
    std::vector<ExprPtr> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      args.push_back(parse_expression(with_condexpr));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) error("Expected an expression, got '" + describe(cur()) + "'");
    }
    auto e = make_expr(EK::kTuple, line);
    e->args = std::move(args);
    return e;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard guard(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    int line = cur().line;
    ExprPtr e1 = parse_or();
    while (skip_name("if")) {
      ExprPtr e2 = parse_or();
      ExprPtr e3;
      if (skip_name("else")) e3 = parse_condexpr();
      bump_chain();
      auto c = make_expr(EK::kCond, line);
      c->a = std::move(e1);
      c->b = std::move(e2);
      c->c = std::move(e3);
      e1 = std::move(c);
      line = cur().line;
    }
    return e1;
  }

  ExprPtr binary(EK kind, std::string op, ExprPtr l, ExprPtr r, int line) {
    bump_chain();
    auto e = make_expr(kind, line);
    e->name = std::move(op);
    e->a = std::move(l);
    e->b = std::move(r);
    return e;
  }

  ExprPtr parse_or() {
    const int line = cur().line;
    ExprPtr l = parse_and();
    while (skip_name("or")) l = binary(EK::kOr, "or", std::move(l), parse_and(), line);
    return l;
  }
  ExprPtr parse_and() {
    const int line = cur().line;
    ExprPtr l = parse_not();
    while (skip_name("and")) l = binary(EK::kAnd, "and", std::move(l), parse_not(), line);
    return l;
  }
  ExprPtr parse_not() {
    DepthGuard guard(*this);
    if (is_name("not")) {
      auto e = make_expr(EK::kUnary, cur().line);
      advance();
      e->name = "not";
      e->a = parse_not();
      return e;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const int line = cur().line;
    ExprPtr first = parse_math1();
    auto e = make_expr(EK::kCompare, line);
    while (true) {
      if (cur().type == Tok::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                     cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        e->ops.push_back(cur().text);
        advance();
      } else if (skip_name("in")) {
        e->ops.push_back("in");
      } else if (is_name("not") && look().type == Tok::kName && look().text == "in") {
        advance();
        advance();
        e->ops.push_back("notin");
      } else {
        break;
      }
      e->args.push_back(parse_math1());
      bump_chain();
    }
    if (e->ops.empty()) return first;
    e->a = std::move(first);
    return e;
  }
  ExprPtr parse_math1() {
    const int line = cur().line;
    ExprPtr l = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = cur().text;
      advance();
      l = binary(EK::kBinary, op, std::move(l), parse_concat(), line);
    }
    return l;
  }
  ExprPtr parse_concat() {
    const int line = cur().line;
    ExprPtr l = parse_math2();
    while (skip_op("~")) l = binary(EK::kBinary, "~", std::move(l), parse_math2(), line);
    return l;
  }
  ExprPtr parse_math2() {
    const int line = cur().line;
    ExprPtr l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = cur().text;
      advance();
      l = binary(EK::kBinary, op, std::move(l), parse_pow(), line);
    }
    return l;
  }
  ExprPtr parse_pow() {
    const int line = cur().line;
    ExprPtr l = parse_unary(true);
    while (skip_op("**")) l = binary(EK::kBinary, "**", std::move(l), parse_unary(true), line);
    return l;
  }
  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    const int line = cur().line;
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      node = make_expr(EK::kUnary, line);
      node->name = cur().text;
      advance();
      node->a = parse_unary(false);
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (with_filter) node = parse_filter_expr(std::move(node));
    return node;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    const int line = t.line;
    if (t.type == Tok::kName) {
      auto e = make_expr(EK::kLiteral, line);
      if (t.text == "true" || t.text == "True") {
        e->value = Value::boolean(true);
      } else if (t.text == "false" || t.text == "False") {
        e->value = Value::boolean(false);
      } else if (t.text == "none" || t.text == "None") {
        e->value = Value::none();
      } else {
        e->kind = EK::kName;
        e->name = t.text;
      }
      advance();
      return e;
    }
    if (t.type == Tok::kString) {
      std::string s;
      while (cur().type == Tok::kString) {
        s += cur().text;
        advance();
      }
      auto e = make_expr(EK::kLiteral, line);
      e->value = Value::str(std::move(s));
      return e;
    }
    if (t.type == Tok::kInt || t.type == Tok::kFloat) {
      auto e = make_expr(EK::kLiteral, line);
      e->value = t.type == Tok::kInt ? Value::integer(t.ival) : Value::real(t.fval);
      advance();
      return e;
    }
    if (skip_op("(")) {
      ExprPtr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (skip_op("[")) {
      auto e = make_expr(EK::kList, line);
      while (!is_op("]")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("]")) break;
        e->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return e;
    }
    if (skip_op("{")) {
      auto e = make_expr(EK::kDict, line);
      while (!is_op("}")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("}")) break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return e;
    }
    error("unexpected '" + describe(t) + "'");
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        bump_chain();
        node = parse_subscript(std::move(node));
      } else if (is_op("(")) {
        bump_chain();
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        node = parse_filter(std::move(node), false);
      } else if (is_name("is")) {
        bump_chain();
        node = parse_test(std::move(node));
      } else if (is_op("(")) {
        bump_chain();
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node) {
    const int line = cur().line;
    if (skip_op(".")) {
      if (cur().type == Tok::kName) {
        auto e = make_expr(EK::kAttr, line);
        e->a = std::move(node);
        e->name = cur().text;
        advance();
        return e;
      }
      if (cur().type != Tok::kInt) error("expected name or number");
      auto e = make_expr(EK::kItem, line);
      e->a = std::move(node);
      e->b = make_expr(EK::kLiteral, line);
      e->b->value = Value::integer(cur().ival);
      advance();
      return e;
    }
    expect_op("[");
    std::vector<ExprPtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");
    auto e = make_expr(EK::kItem, line);
    e->a = std::move(node);
    if (args.size() == 1) {
      e->b = std::move(args[0]);
    } else {
      e->b = make_expr(EK::kTuple, line);
      e->b->args = std::move(args);
    }
    return e;
  }

  ExprPtr parse_subscribed() {
    const int line = cur().line;
    auto slice = make_expr(EK::kSlice, line);
    if (!skip_op(":")) {
      ExprPtr node = parse_expression(true);
      if (!skip_op(":")) return node;
      slice->a = std::move(node);
    }
    if (!is_op(":") && !is_op("]") && !is_op(",")) slice->b = parse_expression(true);
    if (skip_op(":")) {
      if (!is_op("]") && !is_op(",")) slice->c = parse_expression(true);
    }
    return slice;
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    bool require_comma = false;
    while (!is_op(")")) {
      if (require_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*") || is_op("**")) error("*args and **kwargs in calls are not supported");
      if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == "=") {
        std::string key = cur().text;
        advance();
        advance();
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!e.kwargs.empty()) error("invalid syntax for function call expression");
        e.args.push_back(parse_expression(true));
      }
      require_comma = true;
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr node) {
    auto e = make_expr(EK::kCall, cur().line);
    e->a = std::move(node);
    parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter(ExprPtr node, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) advance();
      start_inline = false;
      bump_chain();
      const int line = cur().line;
      std::string name = expect_name();
      while (skip_op(".")) name += "." + expect_name();
      if (!is_jinja_filter(name)) fail_line(line, "No filter named '" + name + "'.");
      auto f = make_expr(EK::kFilter, line);
      f->name = std::move(name);
      f->a = std::move(node);
      if (is_op("(")) parse_call_args(*f);
      node = std::move(f);
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    const int line = cur().line;
    advance();  // is
    auto e = make_expr(EK::kTest, line);
    e->negated = skip_name("not");
    e->name = expect_name();
    while (skip_op(".")) e->name += "." + expect_name();
    if (!is_jinja_test(e->name)) fail_line(line, "No test named '" + e->name + "'.");
    e->a = std::move(node);
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((cur().type == Tok::kName || cur().type == Tok::kString || cur().type == Tok::kInt ||
                cur().type == Tok::kFloat || is_op("(") || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) error("You cannot chain multiple tests with is");
      e->args.push_back(parse_postfix(parse_primary()));
    }
    return e;
  }

  // Bounds the recursion of the parser (and so of the evaluator) on pathological nesting.
  struct DepthGuard {
    explicit DepthGuard(Parser& p) : p_(p) {
      if (++p_.depth_ > kMaxDepth) p_.error("template nested too deeply");
    }
    ~DepthGuard() { --p_.depth_; }
    Parser& p_;
  };
  static constexpr int kMaxDepth = 300;
  // Operators, filters, calls and subscripts chain left-deep without recursing in the parser,
  // but the evaluator recurses over them: bound them per statement too.
  void bump_chain() {
    if (++chain_ > kMaxChain) error("expression too long");
  }
  static constexpr int kMaxChain = 1000;
  int chain_ = 0;

  std::vector<Token> t_;
  size_t p_ = 0;
  int loop_depth_ = 0;
  int depth_ = 0;
};

}  // namespace

Body parse(std::vector<Token> tokens) { return Parser(std::move(tokens)).parse(); }

}  // namespace ftune::tok::jinja
