// The Value type's core Python semantics for the chat-template interpreter (see value.h):
// type names, truthiness, str()/repr(), json.dumps, iteration, len(), ==/< and `in`, dicts.
// Trade-off: dicts are insertion-ordered vectors searched linearly with py_equal, as small as
// chat messages are, which keeps Python's key order and its 1 == 1.0 == True key equality.
#include "tokenizer/chat_template/value.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>

#include "tokenizer/unicode.h"

namespace ftune::tok::jinja {

std::string py_type_name(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "Undefined";
    case Value::Type::kNone: return "NoneType";
    case Value::Type::kBool: return "bool";
    case Value::Type::kInt: return "int";
    case Value::Type::kFloat: return "float";
    case Value::Type::kString: return "str";
    case Value::Type::kList: return v.generator ? "generator" : v.tuple ? "tuple" : "list";
    case Value::Type::kDict: return "dict";
    case Value::Type::kObject: return v.obj->type_name;
    case Value::Type::kFunction: return "function";
  }
  return "object";
}

bool truthy(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined:
    case Value::Type::kNone: return false;
    case Value::Type::kBool:
    case Value::Type::kInt: return v.i != 0;
    case Value::Type::kFloat: return v.f != 0.0;
    case Value::Type::kString: return !v.s.empty();
    case Value::Type::kList: return v.generator || !v.list->empty();
    case Value::Type::kDict: return !v.dict->empty();
    default: return true;
  }
}

// Python's str(v), which is what {{ v }} prints.
std::string py_str(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "";
    case Value::Type::kNone: return "None";
    case Value::Type::kBool: return v.i ? "True" : "False";
    case Value::Type::kInt: return std::to_string(v.i);
    case Value::Type::kFloat: return py_float_repr(v.f);
    case Value::Type::kString: return v.s;
    default: return py_repr(v);
  }
}

std::string py_repr(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "Undefined";
    case Value::Type::kString: return v.markup ? "Markup(" + py_str_repr(v.s) + ")" : py_str_repr(v.s);
    case Value::Type::kList: {
      if (v.generator) return "<generator object>";
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += ", ";
        out += py_repr((*v.list)[k]);
      }
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Value::Type::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : *v.dict) {
        if (!first) out += ", ";
        first = false;
        out += py_repr(k) + ": " + py_repr(x);
      }
      return out + "}";
    }
    case Value::Type::kObject: {
      if (v.obj->type_name == "Namespace") {
        std::string out = "<Namespace {";
        bool first = true;
        for (const auto& [k, x] : v.obj->attrs) {
          if (!first) out += ", ";
          first = false;
          out += py_str_repr(k) + ": " + py_repr(x);
        }
        return out + "}>";
      }
      const Value* index = v.obj->find("index");
      const Value* length = v.obj->find("length");
      return "<LoopContext " + (index ? py_str(*index) : "?") + "/" +
             (length ? py_str(*length) : "?") + ">";
    }
    case Value::Type::kFunction: return "<function " + v.s + ">";
    default: return py_str(v);
  }
}

namespace {

void json_string(std::string_view s, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    char buf[16];
    switch (c) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
      if (c >= 0x10000) {
        const char32_t v = c - 0x10000;
        std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (v >> 10)),
                      static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
      } else {
        std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      }
      out += buf;
    } else {
      utf8_append(out, c);
    }
  }
  out += '"';
}

std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return py_float_repr(d);
}

}  // namespace

void json_dump(const Value& v, const JsonOptions& o, int level, std::string& out, int line) {
  auto newline = [&](int lvl) {
    out += '\n';
    for (int k = 0; k < lvl; ++k) out += *o.indent;
  };
  switch (v.type) {
    case Value::Type::kNone: out += "null"; return;
    case Value::Type::kBool: out += v.i ? "true" : "false"; return;
    case Value::Type::kInt: out += std::to_string(v.i); return;
    case Value::Type::kFloat: out += json_float(v.f); return;
    case Value::Type::kString: json_string(v.s, o.ensure_ascii, out); return;
    case Value::Type::kList: {
      if (v.generator) fail_line(line, "Object of type generator is not JSON serializable");
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      if (o.indent) newline(level + 1);
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) {
          out += o.item_sep;
          if (o.indent) newline(level + 1);
        }
        json_dump((*v.list)[k], o, level + 1, out, line);
      }
      if (o.indent) newline(level);
      out += ']';
      return;
    }
    case Value::Type::kDict: {
      if (v.dict->empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> items;
      for (const auto& [k, x] : *v.dict) {
        std::string key;
        switch (k.type) {
          case Value::Type::kString: key = k.s; break;
          case Value::Type::kInt: key = std::to_string(k.i); break;
          case Value::Type::kBool: key = k.i ? "true" : "false"; break;
          case Value::Type::kFloat: key = json_float(k.f); break;
          case Value::Type::kNone: key = "null"; break;
          default:
            fail_line(line, "keys must be str, int, float, bool or None, not " + py_type_name(k));
        }
        items.emplace_back(key, &x);
      }
      if (o.sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out += '{';
      if (o.indent) newline(level + 1);
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) {
          out += o.item_sep;
          if (o.indent) newline(level + 1);
        }
        json_string(items[k].first, o.ensure_ascii, out);
        out += o.key_sep;
        json_dump(*items[k].second, o, level + 1, out, line);
      }
      if (o.indent) newline(level);
      out += '}';
      return;
    }
    default:
      fail_line(line, "Object of type " + py_type_name(v) + " is not JSON serializable");
  }
}
[[noreturn]] void undefined_error(const Value& u, int line) {
  fail_line(line, u.s.empty() ? "undefined value" : u.s);
}

Value generator(ValueList items) {
  Value v = Value::make_list(std::move(items));
  v.generator = true;
  return v;
}

std::string object_desc(const Value& v) { return "'" + py_type_name(v) + " object'"; }

Value no_attribute(const Value& obj, const std::string& name) {
  return Value::undefined(object_desc(obj) + " has no attribute '" + name + "'");
}

// Python's iter(v), materialized.
ValueList iterate(const Value& v, int line) {
  switch (v.type) {
    case Value::Type::kList: return *v.list;
    case Value::Type::kDict: {
      ValueList keys;
      for (const auto& kv : *v.dict) keys.push_back(kv.first);
      return keys;
    }
    case Value::Type::kString: {
      ValueList chars;
      for (size_t i = 0; i < v.s.size();) {
        const size_t start = i;
        utf8_next(v.s, i);
        chars.push_back(Value::str(v.s.substr(start, i - start)));
      }
      return chars;
    }
    case Value::Type::kUndefined: return {};
    default: fail_line(line, "'" + py_type_name(v) + "' object is not iterable");
  }
}

int64_t py_len(const Value& v, int line) {
  switch (v.type) {
    case Value::Type::kString: return static_cast<int64_t>(to_u32(v.s).size());
    case Value::Type::kList:
      if (v.generator) break;
      return static_cast<int64_t>(v.list->size());
    case Value::Type::kDict: return static_cast<int64_t>(v.dict->size());
    case Value::Type::kUndefined: return 0;
    default: break;
  }
  fail_line(line, "object of type '" + py_type_name(v) + "' has no len()");
}

bool py_equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_int_like() && b.is_int_like()) return a.i == b.i;
    return a.as_double() == b.as_double();
  }
  if (a.type != b.type) return false;
  switch (a.type) {
    case Value::Type::kUndefined:
    case Value::Type::kNone: return true;
    case Value::Type::kString: return a.s == b.s;
    case Value::Type::kList: {
      if (a.generator || b.generator) return a.list == b.list;
      if (a.tuple != b.tuple || a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!py_equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    }
    case Value::Type::kDict: {
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        bool found = false;
        for (const auto& [k2, v2] : *b.dict) {
          if (py_equal(k, k2)) {
            if (!py_equal(v, v2)) return false;
            found = true;
            break;
          }
        }
        if (!found) return false;
      }
      return true;
    }
    case Value::Type::kObject: return a.obj == b.obj;
    case Value::Type::kFunction: return a.fn == b.fn;
    default: return false;
  }
}

bool py_less(const Value& a, const Value& b, int line) {
  if (a.is_number() && b.is_number()) {
    if (a.is_int_like() && b.is_int_like()) return a.i < b.i;
    return a.as_double() < b.as_double();
  }
  if (a.is_undefined()) undefined_error(a, line);
  if (b.is_undefined()) undefined_error(b, line);
  if (a.is_string() && b.is_string()) return a.s < b.s;  // UTF-8 byte order is code point order
  if (a.is_list() && b.is_list() && a.tuple == b.tuple && !a.generator && !b.generator) {
    const size_t n = std::min(a.list->size(), b.list->size());
    for (size_t k = 0; k < n; ++k) {
      if (!py_equal((*a.list)[k], (*b.list)[k])) return py_less((*a.list)[k], (*b.list)[k], line);
    }
    return a.list->size() < b.list->size();
  }
  fail_line(line, "'<' not supported between instances of '" + py_type_name(a) + "' and '" +
                      py_type_name(b) + "'");
}

// Python's hash(): lists, dicts, generators, namespaces and undefined cannot be dict keys.
bool hashable(const Value& v) {
  if (v.is_dict() || v.is_undefined() || v.type == Value::Type::kObject) return false;
  if (v.is_list()) {
    if (!v.tuple || v.generator) return v.generator;
    return std::all_of(v.list->begin(), v.list->end(), hashable);
  }
  return true;
}

void require_hashable(const Value& v, int line) {
  if (!hashable(v)) fail_line(line, "unhashable type: '" + py_type_name(v) + "'");
}

bool contains(const Value& container, const Value& item, int line) {
  switch (container.type) {
    case Value::Type::kString:
      if (!item.is_string()) {
        fail_line(line, "'in <string>' requires string as left operand, not " + py_type_name(item));
      }
      return container.s.find(item.s) != std::string::npos;
    case Value::Type::kList:
      for (const auto& x : *container.list) {
        if (py_equal(x, item)) return true;
      }
      return false;
    case Value::Type::kDict:
      require_hashable(item, line);
      for (const auto& kv : *container.dict) {
        if (py_equal(kv.first, item)) return true;
      }
      return false;
    case Value::Type::kUndefined: return false;
    default: fail_line(line, "argument of type '" + py_type_name(container) + "' is not iterable");
  }
}

bool compare(const std::string& op, const Value& a, const Value& b, int line) {
  if (op == "==") return py_equal(a, b);
  if (op == "!=") return !py_equal(a, b);
  if (op == "in") return contains(b, a, line);
  if (op == "notin") return !contains(b, a, line);
  if (a.is_number() && b.is_number() && !(a.is_int_like() && b.is_int_like())) {
    const double x = a.as_double(), y = b.as_double();
    if (op == "<") return x < y;
    if (op == "<=") return x <= y;
    if (op == ">") return x > y;
    return x >= y;
  }
  if (op == "<") return py_less(a, b, line);
  if (op == ">") return py_less(b, a, line);
  if (op == "<=") return !py_less(b, a, line);
  return !py_less(a, b, line);
}

void dict_set(ValueDict& d, Value key, Value value) {
  for (auto& kv : d) {
    if (py_equal(kv.first, key)) {
      kv.second = std::move(value);
      return;
    }
  }
  d.emplace_back(std::move(key), std::move(value));
}

const Value* dict_find(const ValueDict& d, const Value& key) {
  for (const auto& kv : d) {
    if (py_equal(kv.first, key)) return &kv.second;
  }
  return nullptr;
}

int64_t to_index_arg(const Value& v, int line, const char* what) {
  if (!v.is_int_like()) fail_line(line, std::string(what) + " must be an integer, not " + py_type_name(v));
  return v.i;
}

}  // namespace ftune::tok::jinja
