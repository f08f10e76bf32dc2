// jinja2's builtin filters (`x | trim`, `tojson`, `map`, `selectattr`, `sort`, ...) and tests
// (`x is defined`, `is string`, `is divisibleby(3)`, ...) for the chat-template interpreter, as
// two name dispatchers; see builtins.h. Trade-off: one if-chain per dispatcher, in jinja2's
// argument order with its keyword names, rather than a registry of callables: easy to compare
// with jinja2/filters.py and tests.py, at the cost of two long functions.
#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <utility>

#include "tokenizer/chat_template/builtins.h"

namespace ftune::tok::jinja {

// Every builtin filter and test of jinja2 3.1: a name outside these lists is a compile error in
// jinja2, so it is one here too; a listed one we do not implement fails only when it runs.
bool is_jinja_filter(const std::string& n) {
  static const char* kNames[] = {
      "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
      "escape", "filesizeformat", "first", "float", "forceescape", "format", "groupby", "indent",
      "int", "join", "last", "length", "list", "lower", "items", "map", "min", "max", "pprint",
      "random", "reject", "rejectattr", "replace", "reverse", "round", "safe", "select",
      "selectattr", "slice", "sort", "string", "striptags", "sum", "title", "trim", "truncate",
      "unique", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr", "tojson"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}
bool is_jinja_test(const std::string& n) {
  static const char* kNames[] = {
      "odd", "even", "divisibleby", "defined", "undefined", "filter", "test", "none", "boolean",
      "false", "true", "integer", "float", "lower", "upper", "string", "mapping", "number",
      "sequence", "iterable", "callable", "sameas", "escaped", "in", "==", "eq", "equalto", "!=",
      "ne", ">", "gt", "greaterthan", "ge", ">=", "<", "lt", "lessthan", "<=", "le"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}
bool apply_test(const std::string& name, const Value& v, CallArgs& a) {
  const int line = a.line;
  static const char* kNoArgs[] = {"defined", "undefined", "none", "boolean", "false", "true", "integer",
                                  "float", "number", "string", "mapping", "iterable", "sequence", "callable",
                                  "escaped", "lower", "upper", "odd", "even", "filter", "test"};
  const size_t given = a.pos.size() + a.kw.size();
  const bool no_args = std::find(std::begin(kNoArgs), std::end(kNoArgs), name) != std::end(kNoArgs);
  if ((no_args && given > 0) || given > 1) {
    fail_line(line, "test_" + name + "() takes " + (no_args ? "1" : "2") + " positional arguments but " +
                        std::to_string(given + 1) + " were given");
  }
  auto arg0 = [&]() -> Value {
    const Value* x = a.get(0, "other");
    if (!x) fail_line(line, "test '" + name + "' needs an argument");
    return *x;
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.i == 1;
  if (name == "false") return v.is_bool() && v.i == 0;
  if (name == "integer") return v.type == Value::Type::kInt;
  if (name == "float") return v.type == Value::Type::kFloat;
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  if (name == "iterable") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
  if (name == "sequence") return (v.is_list() && !v.generator) || v.is_dict() || v.is_string() || v.is_undefined();
  if (name == "callable") {
    return v.type == Value::Type::kFunction || v.is_undefined() ||
           (v.type == Value::Type::kObject && v.obj->type_name == "LoopContext");
  }
  if (name == "escaped") return v.markup;
  if (name == "odd" || name == "even" || name == "divisibleby") {
    const Value d = name == "divisibleby" ? a.get_or(0, "num", Value()) : Value::integer(2);
    const Value r = binary_op("%", v, d, line);
    return py_equal(r, Value::integer(name == "odd" ? 1 : 0));
  }
  if (name == "sameas") {
    const Value o = arg0();
    if (v.type != o.type) return false;
    if (v.is_list()) return v.list == o.list;
    if (v.is_dict()) return v.dict == o.dict;
    if (v.type == Value::Type::kObject) return v.obj == o.obj;
    if (v.type == Value::Type::kFunction) return v.fn == o.fn;
    return py_equal(v, o);
  }
  if (name == "in") return contains(a.get_or(0, "seq", Value()), v, line);
  if (name == "==" || name == "eq" || name == "equalto") return compare("==", v, arg0(), line);
  if (name == "!=" || name == "ne") return compare("!=", v, arg0(), line);
  if (name == ">" || name == "gt" || name == "greaterthan") return compare(">", v, arg0(), line);
  if (name == ">=" || name == "ge") return compare(">=", v, arg0(), line);
  if (name == "<" || name == "lt" || name == "lessthan") return compare("<", v, arg0(), line);
  if (name == "<=" || name == "le") return compare("<=", v, arg0(), line);
  if (name == "lower" || name == "upper") {
    CallArgs none;
    none.line = line;
    return truthy(call_str_method(py_str(v), name == "lower" ? "islower" : "isupper", none));
  }
  if (name == "filter") return v.is_string() && is_jinja_filter(v.s);
  if (name == "test") return v.is_string() && is_jinja_test(v.s);
  fail_line(line, "No test named '" + name + "'.");
}

namespace {

// Splits `args` for map/select: leading positional arguments become the name, the rest is
// passed on.
CallArgs rest_args(const CallArgs& a, size_t skip) {
  CallArgs r;
  r.line = a.line;
  for (size_t k = skip; k < a.pos.size(); ++k) r.pos.push_back(a.pos[k]);
  r.kw = a.kw;
  return r;
}

Value sort_key(const Value& item, const Value& attribute, bool case_sensitive, int line) {
  Value k = attribute.is_none() ? item : attr_path(item, attribute, nullptr, line);
  if (!case_sensitive && k.is_string()) k = Value::str(lower_str(k.s));
  return k;
}

}  // namespace

Value apply_filter(const std::string& name, const Value& v, CallArgs& a) {
  const int line = a.line;
  auto str_of = [&](const char* kw, size_t idx, const char* def) {
    return py_str(a.get_or(idx, kw, Value::str(def)));
  };
  if (name == "length" || name == "count") return Value::integer(py_len(v, line));
  if (name == "default" || name == "d") {
    const bool boolean = truthy(a.get_or(1, "boolean", Value::boolean(false)));
    if (v.is_undefined() || (boolean && !truthy(v))) return a.get_or(0, "default_value", Value::str(""));
    return v;
  }
  // These filters call a str method on soft_str(value), so a Markup input gives a Markup.
  auto like_input = [&](std::string text) { return v.markup ? Value::markup_str(std::move(text)) : Value::str(std::move(text)); };
  if (name == "trim") {
    const Value chars = a.get_or(0, "chars", Value::none());
    std::u32string cs;
    if (!chars.is_none()) cs = to_u32(v.markup ? html_escape(py_str(chars)) : py_str(chars));
    return like_input(py_strip(py_str(v), chars.is_none() ? nullptr : &cs, true, true));
  }
  if (name == "upper") return like_input(upper_str(py_str(v)));
  if (name == "lower") return like_input(lower_str(py_str(v)));
  if (name == "capitalize") return like_input(capitalize_str(py_str(v)));
  if (name == "title") {
    // jinja2's own title: words start after spaces and -({[<, the rest is lowered.
    const std::u32string u = to_u32(py_str(v));
    std::u32string out;
    bool start = true;
    for (char32_t c : u) {
      const bool sep = is_py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
      out += sep ? c : (start ? to_upper_cp(c) : to_lower_cp(c));
      start = sep;
    }
    return Value::str(from_u32(out));
  }
  if (name == "safe") return v.markup ? v : Value::markup_str(py_str(v));
  if (name == "string") return v.is_string() ? v : Value::str(py_str(v));
  if (name == "escape" || name == "e") return v.markup ? v : Value::markup_str(html_escape(py_str(v)));
  if (name == "forceescape") return Value::markup_str(html_escape(py_str(v)));
  if (name == "tojson") {
    JsonOptions o;
    o.ensure_ascii = truthy(a.get_or(0, "ensure_ascii", Value::boolean(false)));
    const Value indent = a.get_or(1, "indent", Value::none());
    if (indent.is_int_like()) {
      o.indent = std::string(static_cast<size_t>(std::max<int64_t>(0, indent.i)), ' ');
    } else if (indent.is_string()) {
      o.indent = indent.s;
    } else if (!indent.is_none()) {
      fail_line(line, "tojson: indent must be an int or a string");
    }
    const Value seps = a.get_or(2, "separators", Value::none());
    if (seps.is_list() && seps.list->size() == 2) {
      o.item_sep = py_str((*seps.list)[0]);
      o.key_sep = py_str((*seps.list)[1]);
    } else if (!seps.is_none()) {
      fail_line(line, "tojson: separators must be a pair of strings");
    } else if (o.indent) {
      o.item_sep = ",";
    }
    o.sort_keys = truthy(a.get_or(3, "sort_keys", Value::boolean(false)));
    std::string out;
    json_dump(v, o, 0, out, line);
    return Value::str(out);
  }
  if (name == "first") {
    const ValueList items = iterate(v, line);
    return items.empty() ? Value::undefined("No first item, sequence was empty.") : items.front();
  }
  if (name == "last") {
    if (v.is_list() && v.generator) fail_line(line, "'generator' object is not reversible");
    const ValueList items = iterate(v, line);
    return items.empty() ? Value::undefined("No last item, sequence was empty.") : items.back();
  }
  if (name == "join") {
    const std::string sep = str_of("d", 0, "");
    const Value attribute = a.get_or(1, "attribute", Value::none());
    std::string out;
    bool first = true;
    for (const auto& x : iterate(v, line)) {
      if (!first) append_bounded(out, sep);
      first = false;
      append_bounded(out, py_str(attribute.is_none() ? x : attr_path(x, attribute, nullptr, line)));
    }
    return Value::str(out);
  }
  if (name == "list") return Value::make_list(iterate(v, line));
  if (name == "replace") {
    const Value count = a.get_or(2, "count", Value::none());
    return Value::str(py_replace(py_str(v), str_of("old", 0, ""), str_of("new", 1, ""),
                                 count.is_none() ? -1 : to_index_arg(count, line, "count")));
  }
  if (name == "int") {
    const Value def = a.get_or(0, "default", Value::integer(0));
    const Value base = a.get_or(1, "base", Value::integer(10));
    if (v.is_undefined()) undefined_error(v, line);
    if (v.is_int_like()) return Value::integer(v.i);
    if (v.type == Value::Type::kFloat) {
      if (std::isnan(v.f)) return def;
      return Value::integer(float_to_int(v.f, line));
    }
    if (v.is_string()) {
      if (auto i = py_parse_int(v.s, static_cast<int>(base.i))) return Value::integer(*i);
      if (auto f = py_parse_float(v.s)) {
        if (std::isnan(*f)) return def;
        return Value::integer(float_to_int(*f, line));
      }
    }
    return def;
  }
  if (name == "float") {
    const Value def = a.get_or(0, "default", Value::real(0.0));
    if (v.is_undefined()) undefined_error(v, line);
    if (v.is_number()) return Value::real(v.as_double());
    if (v.is_string()) {
      if (auto f = py_parse_float(v.s)) return Value::real(*f);
    }
    return def;
  }
  if (name == "abs") {
    if (v.is_int_like()) return Value::integer(std::abs(v.i));
    if (v.type == Value::Type::kFloat) return Value::real(std::fabs(v.f));
    fail_line(line, "bad operand type for abs(): '" + py_type_name(v) + "'");
  }
  if (name == "round") {
    const int64_t precision = to_index_arg(a.get_or(0, "precision", Value::integer(0)), line, "precision");
    const std::string method = str_of("method", 1, "common");
    if (method == "common") return py_round(v, precision, line);
    if (method != "ceil" && method != "floor") fail_line(line, "method must be common, ceil or floor");
    if (!v.is_number()) fail_line(line, "must be real number, not " + py_type_name(v));
    const double p = std::pow(10.0, static_cast<double>(precision));
    const double x = v.as_double() * p;
    return Value::real((method == "ceil" ? std::ceil(x) : std::floor(x)) / p);
  }
  if (name == "items") {
    if (v.is_undefined()) return generator({});
    if (!v.is_dict()) fail_line(line, "Can only get item pairs from a mapping.");
    ValueList out;
    for (const auto& [k, x] : *v.dict) out.push_back(Value::make_list({k, x}, true));
    return generator(std::move(out));
  }
  // map and select/reject are generators that skip a false input (None, empty) entirely.
  if ((name == "map" || name == "select" || name == "reject" || name == "selectattr" ||
       name == "rejectattr") && !truthy(v)) {
    return generator({});
  }
  if (name == "map") {
    ValueList out;
    if (a.pos.empty() && a.get(0, "attribute")) {
      const Value attribute = *a.get(0, "attribute");
      const Value def = a.get_or(99, "default", Value::none());
      for (const auto& x : iterate(v, line)) out.push_back(attr_path(x, attribute, &def, line));
    } else {
      if (a.pos.empty()) fail_line(line, "map requires a filter argument");
      const std::string filter = py_str(a.pos[0]);
      if (!is_jinja_filter(filter)) fail_line(line, "No filter named '" + filter + "'.");
      for (const auto& x : iterate(v, line)) {
        CallArgs rest = rest_args(a, 1);
        out.push_back(apply_filter(filter, x, rest));
      }
    }
    return generator(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool want = name == "select" || name == "selectattr";
    const size_t off = by_attr ? 1 : 0;
    if (by_attr && a.pos.empty()) fail_line(line, "Missing parameter for attribute name");
    ValueList out;
    for (const auto& x : iterate(v, line)) {
      const Value t = by_attr ? attr_path(x, a.pos[0], nullptr, line) : x;
      bool ok;
      if (a.pos.size() > off) {
        const std::string test = py_str(a.pos[off]);
        CallArgs rest = rest_args(a, off + 1);
        ok = apply_test(test, t, rest);
      } else {
        ok = truthy(t);
      }
      if (ok == want) out.push_back(x);
    }
    return generator(std::move(out));
  }
  if (name == "reverse") {
    if (v.is_string()) {
      std::u32string u = to_u32(v.s);
      std::reverse(u.begin(), u.end());
      return Value::str(from_u32(u));
    }
    ValueList items = iterate(v, line);
    std::reverse(items.begin(), items.end());
    if (v.is_list() && v.generator) return Value::make_list(std::move(items));
    return generator(std::move(items));
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max" || name == "dictsort") {
    const bool is_sort = name == "sort";
    const size_t cs_idx = is_sort ? 1 : 0;
    const bool case_sensitive = truthy(a.get_or(cs_idx, "case_sensitive", Value::boolean(false)));
    if (name == "dictsort") {
      if (!v.is_dict()) fail_line(line, "dictsort: a mapping is required");
      const std::string by = str_of("by", 1, "key");
      if (by != "key" && by != "value") fail_line(line, "You can only sort by either \"key\" or \"value\"");
      const bool rev = truthy(a.get_or(2, "reverse", Value::boolean(false)));
      ValueList items;
      for (const auto& [k, x] : *v.dict) items.push_back(Value::make_list({k, x}, true));
      const size_t pos = by == "key" ? 0 : 1;
      std::stable_sort(items.begin(), items.end(), [&](const Value& p, const Value& q) {
        const Value kp = sort_key((*p.list)[pos], Value::none(), case_sensitive, line);
        const Value kq = sort_key((*q.list)[pos], Value::none(), case_sensitive, line);
        return rev ? py_less(kq, kp, line) : py_less(kp, kq, line);
      });
      return Value::make_list(std::move(items));
    }
    const Value attribute = a.get_or(is_sort ? 2 : 1, "attribute", Value::none());
    ValueList items = iterate(v, line);
    if (is_sort) {
      const bool rev = truthy(a.get_or(0, "reverse", Value::boolean(false)));
      std::vector<std::pair<Value, Value>> keyed;
      for (auto& x : items) keyed.emplace_back(sort_key(x, attribute, case_sensitive, line), std::move(x));
      std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& p, const auto& q) {
        return rev ? py_less(q.first, p.first, line) : py_less(p.first, q.first, line);
      });
      ValueList out;
      for (auto& kv : keyed) out.push_back(std::move(kv.second));
      return Value::make_list(std::move(out));
    }
    if (name == "unique") {
      ValueList out, seen;
      for (auto& x : items) {
        const Value k = sort_key(x, attribute, case_sensitive, line);
        require_hashable(k, line);
        if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return py_equal(s, k); })) {
          seen.push_back(k);
          out.push_back(std::move(x));
        }
      }
      return generator(std::move(out));
    }
    if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
    size_t best = 0;
    Value best_key = sort_key(items[0], attribute, case_sensitive, line);
    for (size_t k = 1; k < items.size(); ++k) {
      const Value key = sort_key(items[k], attribute, case_sensitive, line);
      if (name == "min" ? py_less(key, best_key, line) : py_less(best_key, key, line)) {
        best = k;
        best_key = key;
      }
    }
    return items[best];
  }
  if (name == "sum") {
    const Value attribute = a.get_or(0, "attribute", Value::none());
    Value total = a.get_or(1, "start", Value::integer(0));
    for (const auto& x : iterate(v, line)) {
      total = binary_op("+", total, attribute.is_none() ? x : attr_path(x, attribute, nullptr, line), line);
    }
    return total;
  }
  if (name == "wordcount") {
    const std::u32string u = to_u32(py_str(v));
    int64_t n = 0;
    bool in_word = false;
    for (char32_t c : u) {
      const bool w = is_alpha_cp(c) || is_digit_cp(c) || c == '_';
      if (w && !in_word) ++n;
      in_word = w;
    }
    return Value::integer(n);
  }
  if (name == "center") {
    const int64_t w = to_index_arg(a.get_or(0, "width", Value::integer(80)), line, "width");
    return like_input(pad_str(py_str(v), w, ' ', 0));
  }
  if (name == "indent") {
    if (v.is_undefined()) undefined_error(v, line);
    if (!v.is_string()) fail_line(line, "unsupported operand type(s) for +=: '" + py_type_name(v) + "' and 'str'");
    const Value width = a.get_or(0, "width", Value::integer(4));
    const bool first = truthy(a.get_or(1, "first", Value::boolean(false)));
    const bool blank = truthy(a.get_or(2, "blank", Value::boolean(false)));
    const int64_t n_ind = width.is_string() ? 0 : std::max<int64_t>(0, to_index_arg(width, line, "width"));
    if (n_ind > static_cast<int64_t>(kMaxStringBytes)) fail_too_large();
    const std::string ind = width.is_string() ? width.s : std::string(static_cast<size_t>(n_ind), ' ');
    const std::vector<std::string> lines = py_splitlines(py_str(v) + "\n", false);
    std::string out;
    for (size_t k = 0; k < lines.size(); ++k) {
      if (k) out += "\n";
      if (k == 0 || (!blank && lines[k].empty())) {
        out += lines[k];
      } else {
        append_bounded(out, ind);
        out += lines[k];
      }
    }
    if (first) out = ind + out;
    return like_input(out);
  }
  if (name == "format") {
    if (!a.pos.empty() && !a.kw.empty()) fail_line(line, "can't handle positional and keyword arguments at the same time");
    Value args;
    if (!a.kw.empty()) {
      ValueDict d;
      for (const auto& [k, x] : a.kw) d.emplace_back(Value::str(k), x);
      args = Value::make_dict(std::move(d));
    } else {
      args = Value::make_list(a.pos, true);
    }
    return like_input(py_percent_format(py_str(v), args, line, v.markup));
  }
  if (name == "attr") {
    const std::string attr = str_of("name", 0, "");
    if (v.is_dict() && !is_dict_method(attr)) return no_attribute(v, attr);
    return get_attr(v, attr, line);
  }
  fail_line(line, "the filter '" + name + "' is not supported");
}

}  // namespace ftune::tok::jinja
