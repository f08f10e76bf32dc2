// The dynamic Value of the chat-template interpreter and Python's semantics on it: truthiness,
// str()/repr(), json.dumps, equality and ordering, `in`, arithmetic, attribute/item/slice access
// and the str/dict/list methods templates call. Trade-off: our own small tagged Value rather
// than nlohmann::json, so Python's int/float/bool/tuple distinctions, undefined, Markup strings,
// namespace and loop objects and callables all survive. Defined in value.cpp (type, printing,
// JSON, comparisons), operators.cpp (arithmetic, %-formatting) and methods.cpp (attributes,
// items, slices, methods).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/chat_template/text.h"

namespace ftune::tok::jinja {

struct Value;
struct Object;
struct CallArgs;
using ValueList = std::vector<Value>;
using ValueDict = std::vector<std::pair<Value, Value>>;  // insertion-ordered like a Python dict
using NativeFn = std::function<Value(CallArgs&)>;

struct Value {
  enum class Type { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kObject, kFunction };
  Type type = Type::kUndefined;
  bool tuple = false;      // a list that is a Python tuple (prints with parentheses)
  bool generator = false;  // an iterator (select, map, reverse...): always true, has no len()
  bool markup = false;     // a str that is markupsafe.Markup (from |safe or |e): `+` escapes the other side
  int64_t i = 0;       // int, and bool as 0/1 (Python's bool is an int)
  double f = 0;
  std::string s;  // str; for undefined, the error raised when it is used; for functions, the name
  std::shared_ptr<ValueList> list;
  std::shared_ptr<ValueDict> dict;
  std::shared_ptr<Object> obj;
  std::shared_ptr<NativeFn> fn;

  static Value undefined(std::string hint) {
    Value v;
    v.s = std::move(hint);
    return v;
  }
  static Value none() {
    Value v;
    v.type = Type::kNone;
    return v;
  }
  static Value boolean(bool b) {
    Value v;
    v.type = Type::kBool;
    v.i = b ? 1 : 0;
    return v;
  }
  static Value integer(int64_t x) {
    Value v;
    v.type = Type::kInt;
    v.i = x;
    return v;
  }
  static Value real(double x) {
    Value v;
    v.type = Type::kFloat;
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    if (x.size() > kMaxStringBytes) fail_too_large();
    Value v;
    v.type = Type::kString;
    v.s = std::move(x);
    return v;
  }
  static Value markup_str(std::string x) {
    Value v = str(std::move(x));
    v.markup = true;
    return v;
  }
  static Value make_list(ValueList items, bool is_tuple = false) {
    Value v;
    v.type = Type::kList;
    v.tuple = is_tuple;
    v.list = std::make_shared<ValueList>(std::move(items));
    return v;
  }
  static Value make_dict(ValueDict items) {
    Value v;
    v.type = Type::kDict;
    v.dict = std::make_shared<ValueDict>(std::move(items));
    return v;
  }
  static Value function(std::string name, NativeFn f) {
    Value v;
    v.type = Type::kFunction;
    v.s = std::move(name);
    v.fn = std::make_shared<NativeFn>(std::move(f));
    return v;
  }

  bool is_undefined() const { return type == Type::kUndefined; }
  bool is_none() const { return type == Type::kNone; }
  bool is_string() const { return type == Type::kString; }
  bool is_list() const { return type == Type::kList; }
  bool is_dict() const { return type == Type::kDict; }
  bool is_bool() const { return type == Type::kBool; }
  bool is_int_like() const { return type == Type::kInt || type == Type::kBool; }
  bool is_number() const { return is_int_like() || type == Type::kFloat; }
  double as_double() const { return type == Type::kFloat ? f : static_cast<double>(i); }
};

// A jinja2 Namespace (attributes assignable with {% set ns.x = ... %}) or a loop object.
struct Object {
  std::string type_name;
  bool assignable = false;
  std::vector<std::pair<std::string, Value>> attrs;
  const Value* find(const std::string& name) const {
    for (const auto& kv : attrs) {
      if (kv.first == name) return &kv.second;
    }
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& kv : attrs) {
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    }
    attrs.emplace_back(name, std::move(v));
  }
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  int line = 0;

  // Positional argument `idx` or keyword `name`, if given.
  const Value* get(size_t idx, const char* name) const {
    if (idx < pos.size()) return &pos[idx];
    for (const auto& kv : kw) {
      if (kv.first == name) return &kv.second;
    }
    return nullptr;
  }
  Value get_or(size_t idx, const char* name, Value def) const {
    const Value* v = get(idx, name);
    return v ? *v : std::move(def);
  }
};

// ---- value.cpp
// Fails with the undefined value's own message ("'x' is undefined", "... has no attribute ...").
[[noreturn]] void undefined_error(const Value& u, int line);
std::string py_type_name(const Value& v);  // type(v).__name__
bool truthy(const Value& v);
std::string py_str(const Value& v);  // str(v), which is what {{ v }} prints
std::string py_repr(const Value& v);

struct JsonOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};
// json.dumps(v, ...) appended to `out`, as transformers' tojson calls it.
void json_dump(const Value& v, const JsonOptions& o, int level, std::string& out, int line);

Value generator(ValueList items);             // a one-shot iterator (select, map, ...)
std::string object_desc(const Value& v);      // "'<type> object'"
Value no_attribute(const Value& obj, const std::string& name);  // the undefined for obj.name
ValueList iterate(const Value& v, int line);  // Python's iter(v), materialized
int64_t py_len(const Value& v, int line);
bool py_equal(const Value& a, const Value& b);
bool py_less(const Value& a, const Value& b, int line);
bool hashable(const Value& v);  // can be a dict key
void require_hashable(const Value& v, int line);
bool contains(const Value& container, const Value& item, int line);  // item in container
// op is one of == != < <= > >= in notin.
bool compare(const std::string& op, const Value& a, const Value& b, int line);
void dict_set(ValueDict& d, Value key, Value value);
const Value* dict_find(const ValueDict& d, const Value& key);
// An int argument (width, count, ...), or an error naming `what`.
int64_t to_index_arg(const Value& v, int line, const char* what);

// ---- operators.cpp
// Python's `fmt % args`; escape_args: fmt is Markup, so the arguments are HTML-escaped.
std::string py_percent_format(const std::string& fmt, const Value& args, int line, bool escape_args = false);
int64_t float_to_int(double f, int line);  // int(f), failing where 64 bits do not hold it
// op is one of ~ + - * / // % **.
Value binary_op(const std::string& op, const Value& a, const Value& b, int line);
Value py_round(const Value& v, int64_t precision, int line);  // round(v, precision)

// ---- methods.cpp
bool is_dict_method(const std::string& n);  // items keys values get copy
// str.<name>(args) on `s`.
Value call_str_method(const std::string& s, const std::string& name, CallArgs& a);
Value get_attr(const Value& obj, const std::string& name, int line);  // obj.name
Value get_item(const Value& obj, const Value& key, int line);         // obj[key]
// obj[start:stop:step]; an absent bound is Value::undefined("<absent>").
Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step, int line);
// The item at attribute path "a.b.0" (make_attrgetter); `def` replaces an undefined result.
Value attr_path(const Value& item, const Value& attribute, const Value* def, int line);

}  // namespace ftune::tok::jinja
