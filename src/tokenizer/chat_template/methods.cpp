// Attribute, item and slice access and the methods templates call on values, following jinja2's
// sandboxed getattr/getitem (attribute first for `.`, item first for `[]`): str methods (with
// markupsafe.Markup's escaping variants), dict.items/keys/values/get/copy, list.index/count.
// Trade-off: mutating methods (append, pop, update, ...) are refused as the sandbox refuses them,
// and a missing attribute is an undefined value that fails only when used, as in jinja2.
#include "tokenizer/chat_template/value.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <iterator>
#include <optional>
#include <string>
#include <system_error>

#include "tokenizer/unicode.h"

namespace ftune::tok::jinja {

namespace {

// Python's slice.indices(): the positions a[start:stop:step] selects.
std::vector<int64_t> slice_positions(int64_t len, std::optional<int64_t> start_in,
                                     std::optional<int64_t> stop_in, int64_t step) {
  int64_t start, stop;
  if (!start_in) {
    start = step < 0 ? len - 1 : 0;
  } else {
    start = *start_in;
    if (start < 0) {
      start += len;
      if (start < 0) start = step < 0 ? -1 : 0;
    } else if (start >= len) {
      start = step < 0 ? len - 1 : len;
    }
  }
  if (!stop_in) {
    stop = step < 0 ? -1 : len;
  } else {
    stop = *stop_in;
    if (stop < 0) {
      stop += len;
      if (stop < 0) stop = step < 0 ? -1 : 0;
    } else if (stop >= len) {
      stop = step < 0 ? len - 1 : len;
    }
  }
  std::vector<int64_t> pos;
  if (step > 0) {
    for (int64_t k = start; k < stop; k += step) pos.push_back(k);
  } else {
    for (int64_t k = start; k > stop; k += step) pos.push_back(k);
  }
  return pos;
}

Value py_split(const std::string& s, const CallArgs& a, bool from_right) {
  const Value sep_v = a.get_or(0, "sep", Value::none());
  const Value max_v = a.get_or(1, "maxsplit", Value::integer(-1));
  if (!sep_v.is_none() && !sep_v.is_string()) fail_line(a.line, "must be str or None, not " + py_type_name(sep_v));
  if (!max_v.is_int_like()) fail_line(a.line, "maxsplit must be an integer");
  std::u32string u = to_u32(s);
  std::optional<std::u32string> sep;
  if (sep_v.is_string()) {
    sep = to_u32(sep_v.s);
    if (sep->empty()) fail_line(a.line, "empty separator");
  }
  if (from_right) {
    std::reverse(u.begin(), u.end());
    if (sep) std::reverse(sep->begin(), sep->end());
  }
  auto parts = split_u32(u, sep ? &*sep : nullptr, max_v.i);
  ValueList out;
  for (auto& p : parts) {
    if (from_right) std::reverse(p.begin(), p.end());
    out.push_back(Value::str(from_u32(p)));
  }
  if (from_right) std::reverse(out.begin(), out.end());
  return Value::make_list(std::move(out));
}

// Python's str.format for "{}", "{0}" and "{name}" fields without format specs.
std::string py_str_format(const std::string& fmt, const CallArgs& a) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t k = 0; k < fmt.size(); ++k) {
    const char c = fmt[k];
    if (c == '{' && k + 1 < fmt.size() && fmt[k + 1] == '{') {
      out += '{';
      ++k;
    } else if (c == '}' && k + 1 < fmt.size() && fmt[k + 1] == '}') {
      out += '}';
      ++k;
    } else if (c == '{') {
      const size_t close = fmt.find('}', k);
      if (close == std::string::npos) fail_line(a.line, "Single '{' encountered in format string");
      const std::string field = fmt.substr(k + 1, close - k - 1);
      if (field.find_first_of(":!.[") != std::string::npos) fail_line(a.line, "format specs in str.format are not supported");
      const Value* v = nullptr;
      if (field.empty()) {
        if (auto_idx >= a.pos.size()) fail_line(a.line, "Replacement index out of range");
        v = &a.pos[auto_idx++];
      } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
        size_t idx = 0;
        const auto r = std::from_chars(field.data(), field.data() + field.size(), idx);
        if (r.ec != std::errc() || idx >= a.pos.size()) fail_line(a.line, "Replacement index out of range");
        v = &a.pos[idx];
      } else {
        for (const auto& kv : a.kw) {
          if (kv.first == field) v = &kv.second;
        }
        if (!v) fail_line(a.line, "KeyError: " + py_str_repr(field));
      }
      out += py_str(*v);
      k = close;
    } else if (c == '}') {
      fail_line(a.line, "Single '}' encountered in format string");
    } else {
      out += c;
    }
  }
  return out;
}

bool is_str_method(const std::string& n) {
  static const char* kNames[] = {
      "strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith", "upper", "lower",
      "title", "capitalize", "swapcase", "casefold", "replace", "find", "rfind", "index", "rindex",
      "count", "join", "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "islower",
      "isupper", "isnumeric", "isdecimal", "istitle", "isascii", "zfill", "center", "ljust",
      "rjust", "removeprefix", "removesuffix", "partition", "rpartition", "format", "encode",
      "expandtabs", "format_map", "isidentifier", "isprintable", "maketrans", "translate"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}

}  // namespace

Value call_str_method(const std::string& s, const std::string& name, CallArgs& a) {
  const int line = a.line;
  auto str_arg = [&](size_t idx, const char* kw) -> std::string {
    const Value* v = a.get(idx, kw);
    if (!v) fail_line(line, name + "() missing required argument '" + kw + "'");
    if (!v->is_string()) fail_line(line, name + "() argument must be str, not " + py_type_name(*v));
    return v->s;
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    const Value chars = a.get_or(0, "chars", Value::none());
    std::u32string cs;
    if (!chars.is_none()) {
      if (!chars.is_string()) fail_line(line, name + " arg must be None or str");
      cs = to_u32(chars.s);
    }
    return Value::str(py_strip(s, chars.is_none() ? nullptr : &cs, name != "rstrip", name != "lstrip"));
  }
  if (name == "upper") return Value::str(upper_str(s));
  if (name == "lower" || name == "casefold") return Value::str(lower_str(s));
  if (name == "title") return Value::str(py_title_str(s));
  if (name == "capitalize") return Value::str(capitalize_str(s));
  if (name == "swapcase") {
    std::u32string u = to_u32(s);
    for (char32_t& c : u) c = is_upper_cp(c) ? to_lower_cp(c) : to_upper_cp(c);
    return Value::str(from_u32(u));
  }
  if (name == "startswith" || name == "endswith") {
    const Value* p = a.get(0, "prefix");
    if (!p) fail_line(line, name + "() takes at least 1 argument (0 given)");
    std::vector<std::string> options;
    if (p->is_string()) {
      options.push_back(p->s);
    } else if (p->is_list() && p->tuple) {
      for (const auto& x : *p->list) {
        if (!x.is_string()) fail_line(line, "tuple for " + name + " must only contain str");
        options.push_back(x.s);
      }
    } else {
      fail_line(line, name + " first arg must be str or a tuple of str, not " + py_type_name(*p));
    }
    if (a.pos.size() > 1) fail_line(line, name + "() with start/end arguments is not supported");
    for (const auto& o : options) {
      if (o.size() > s.size()) continue;
      if (name == "startswith" ? s.compare(0, o.size(), o) == 0 : s.compare(s.size() - o.size(), o.size(), o) == 0) {
        return Value::boolean(true);
      }
    }
    return Value::boolean(false);
  }
  if (name == "split" || name == "rsplit") return py_split(s, a, name == "rsplit");
  if (name == "splitlines") {
    ValueList out;
    for (auto& l : py_splitlines(s, truthy(a.get_or(0, "keepends", Value::boolean(false))))) {
      out.push_back(Value::str(std::move(l)));
    }
    return Value::make_list(std::move(out));
  }
  if (name == "replace") {
    const Value count = a.get_or(2, "count", Value::integer(-1));
    return Value::str(py_replace(s, str_arg(0, "old"), str_arg(1, "new"), to_index_arg(count, line, "count")));
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
    if (a.pos.size() > 1) fail_line(line, name + "() with start/end arguments is not supported");
    const std::u32string u = to_u32(s), sub = to_u32(str_arg(0, "sub"));
    if (name == "count") {
      if (sub.empty()) return Value::integer(static_cast<int64_t>(u.size()) + 1);
      int64_t n = 0;
      for (size_t p = u.find(sub); p != std::u32string::npos; p = u.find(sub, p + sub.size())) ++n;
      return Value::integer(n);
    }
    const size_t p = (name == "find" || name == "index") ? u.find(sub) : u.rfind(sub);
    if (p == std::u32string::npos) {
      if (name == "index" || name == "rindex") fail_line(line, "substring not found");
      return Value::integer(-1);
    }
    return Value::integer(static_cast<int64_t>(p));
  }
  if (name == "join") {
    const Value* it = a.get(0, "iterable");
    if (!it) fail_line(line, "join() takes exactly one argument (0 given)");
    std::string out;
    bool first = true;
    for (const auto& x : iterate(*it, line)) {
      if (!x.is_string()) fail_line(line, "sequence item: expected str instance, " + py_type_name(x) + " found");
      if (!first) append_bounded(out, s);
      first = false;
      append_bounded(out, x.s);
    }
    return Value::str(out);
  }
  if (name.rfind("is", 0) == 0 && name != "isidentifier" && name != "isprintable") {
    const std::u32string u = to_u32(s);
    if (name == "islower" || name == "isupper") {
      bool cased = false;
      for (char32_t c : u) {
        if (name == "islower" ? is_upper_cp(c) : is_lower_cp(c)) return Value::boolean(false);
        cased = cased || is_cased_cp(c);
      }
      return Value::boolean(cased);
    }
    if (name == "istitle") return Value::boolean(!u.empty() && py_title_str(s) == s && is_cased_cp(u[0]));
    if (u.empty()) return Value::boolean(false);
    for (char32_t c : u) {
      bool ok = false;
      if (name == "isdigit" || name == "isnumeric" || name == "isdecimal") ok = is_digit_cp(c);
      if (name == "isalpha") ok = is_alpha_cp(c);
      if (name == "isalnum") ok = is_alpha_cp(c) || is_digit_cp(c);
      if (name == "isspace") ok = is_py_space(c);
      if (name == "isascii") ok = c < 0x80;
      if (!ok) return Value::boolean(false);
    }
    return Value::boolean(true);
  }
  if (name == "zfill") {
    const int64_t w = to_index_arg(a.get_or(0, "width", Value::integer(0)), line, "width");
    if (w > static_cast<int64_t>(kMaxStringBytes)) fail_too_large();
    std::string body = s;
    std::string sign;
    if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
      sign = body.substr(0, 1);
      body.erase(0, 1);
    }
    const int64_t len = static_cast<int64_t>(to_u32(s).size());
    return Value::str(sign + std::string(std::max<int64_t>(0, w - len), '0') + body);
  }
  if (name == "center" || name == "ljust" || name == "rjust") {
    const int64_t w = to_index_arg(a.get_or(0, "width", Value::integer(0)), line, "width");
    const std::string fill = a.get_or(1, "fillchar", Value::str(" ")).s;
    const std::u32string f = to_u32(fill);
    if (f.size() != 1) fail_line(line, "The fill character must be exactly one character long");
    return Value::str(pad_str(s, w, f[0], name == "center" ? 0 : name == "ljust" ? -1 : 1));
  }
  if (name == "removeprefix") {
    const std::string p = str_arg(0, "prefix");
    return Value::str(s.compare(0, p.size(), p) == 0 ? s.substr(p.size()) : s);
  }
  if (name == "removesuffix") {
    const std::string p = str_arg(0, "suffix");
    const bool ends = !p.empty() && p.size() <= s.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
    return Value::str(ends ? s.substr(0, s.size() - p.size()) : s);
  }
  if (name == "partition" || name == "rpartition") {
    const std::string sep = str_arg(0, "sep");
    if (sep.empty()) fail_line(line, "empty separator");
    const size_t p = name == "partition" ? s.find(sep) : s.rfind(sep);
    if (p == std::string::npos) {
      return name == "partition"
                 ? Value::make_list({Value::str(s), Value::str(""), Value::str("")}, true)
                 : Value::make_list({Value::str(""), Value::str(""), Value::str(s)}, true);
    }
    return Value::make_list({Value::str(s.substr(0, p)), Value::str(sep), Value::str(s.substr(p + sep.size()))}, true);
  }
  if (name == "format") return Value::str(py_str_format(s, a));
  fail_line(line, "str." + name + "() is not supported");
}

bool is_dict_method(const std::string& n) {
  return n == "items" || n == "keys" || n == "values" || n == "get" || n == "copy";
}

namespace {

bool is_unsafe_method(const Value& v, const std::string& n) {
  static const char* kDict[] = {"clear", "pop", "popitem", "setdefault", "update"};
  static const char* kList[] = {"append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear"};
  if (v.is_dict()) return std::find(std::begin(kDict), std::end(kDict), n) != std::end(kDict);
  if (v.is_list() && !v.tuple && !v.generator) return std::find(std::begin(kList), std::end(kList), n) != std::end(kList);
  return false;
}

// markupsafe.Markup's str methods: string arguments are escaped first (except split's), and
// string results come back as Markup.
Value call_markup_method(const std::string& s, const std::string& name, CallArgs& a) {
  static const char* kWrapped[] = {"capitalize", "title", "lower", "upper", "replace", "ljust", "rjust",
                                   "lstrip", "rstrip", "center", "strip", "expandtabs", "swapcase",
                                   "zfill", "casefold", "removeprefix", "removesuffix", "partition",
                                   "rpartition", "join", "format", "split", "rsplit", "splitlines"};
  if (std::find(std::begin(kWrapped), std::end(kWrapped), name) == std::end(kWrapped)) {
    return call_str_method(s, name, a);
  }
  auto escape_arg = [](Value& v) {
    if (v.is_string() && !v.markup) v = Value::markup_str(html_escape(v.s));
  };
  if (name != "split" && name != "rsplit" && name != "splitlines") {
    for (auto& v : a.pos) escape_arg(v);
    for (auto& kv : a.kw) escape_arg(kv.second);
  }
  if (name == "join" && !a.pos.empty()) {
    ValueList items = iterate(a.pos[0], a.line);
    for (auto& v : items) escape_arg(v);
    a.pos[0] = Value::make_list(std::move(items));
  }
  Value r = call_str_method(s, name, a);
  if (r.is_string()) r.markup = true;
  if (r.is_list()) {
    for (auto& v : *r.list) v.markup = v.is_string();
  }
  return r;
}

Value call_method(const Value& self, const std::string& name, CallArgs& a) {
  if (self.is_string()) return self.markup ? call_markup_method(self.s, name, a) : call_str_method(self.s, name, a);
  if (self.is_dict()) {
    if (name == "get") {
      const Value* k = a.get(0, "key");
      if (!k) fail_line(a.line, "get expected at least 1 argument, got 0");
      const Value* v = dict_find(*self.dict, *k);
      return v ? *v : a.get_or(1, "default", Value::none());
    }
    if (name == "copy") return Value::make_dict(*self.dict);
    ValueList out;
    for (const auto& [k, v] : *self.dict) {
      if (name == "items") out.push_back(Value::make_list({k, v}, true));
      if (name == "keys") out.push_back(k);
      if (name == "values") out.push_back(v);
    }
    return Value::make_list(std::move(out));
  }
  if (self.is_list()) {
    if (name == "copy") return Value::make_list(*self.list);
    const Value* x = a.get(0, "value");
    if (!x) fail_line(a.line, name + "() takes exactly one argument (0 given)");
    int64_t count = 0;
    for (size_t k = 0; k < self.list->size(); ++k) {
      if (py_equal((*self.list)[k], *x)) {
        if (name == "index") return Value::integer(static_cast<int64_t>(k));
        ++count;
      }
    }
    if (name == "index") fail_line(a.line, py_repr(*x) + " is not in list");
    return Value::integer(count);
  }
  fail_line(a.line, "'" + py_type_name(self) + "' object has no method " + name);
}

Value bound_method(const Value& self, const std::string& name) {
  return Value::function(name, [self, name](CallArgs& a) { return call_method(self, name, a); });
}

}  // namespace

// jinja2's sandboxed environment.getattr: attribute first (methods, namespace fields), then item.
Value get_attr(const Value& obj, const std::string& name, int line) {
  switch (obj.type) {
    case Value::Type::kUndefined: undefined_error(obj, line);
    case Value::Type::kDict: {
      if (is_dict_method(name)) return bound_method(obj, name);
      if (is_unsafe_method(obj, name)) {
        return Value::undefined("access to attribute '" + name + "' of 'dict' object is unsafe.");
      }
      if (const Value* v = dict_find(*obj.dict, Value::str(name))) return *v;
      return no_attribute(obj, name);
    }
    case Value::Type::kString:
      if (is_str_method(name)) return bound_method(obj, name);
      return no_attribute(obj, name);
    case Value::Type::kList:
      if (!obj.generator && (name == "index" || name == "count" || (name == "copy" && !obj.tuple))) {
        return bound_method(obj, name);
      }
      if (is_unsafe_method(obj, name)) {
        return Value::undefined("access to attribute '" + name + "' of 'list' object is unsafe.");
      }
      return no_attribute(obj, name);
    case Value::Type::kObject:
      if (const Value* v = obj.obj->find(name)) return *v;
      return no_attribute(obj, name);
    default: return no_attribute(obj, name);
  }
}

// jinja2's environment.getitem: item first, then attribute for string keys.
Value get_item(const Value& obj, const Value& key, int line) {
  switch (obj.type) {
    case Value::Type::kUndefined: undefined_error(obj, line);
    case Value::Type::kList:
    case Value::Type::kString: {
      if (key.is_int_like() && !(obj.is_list() && obj.generator)) {
        int64_t idx = key.i;
        if (obj.is_list()) {
          const int64_t n = static_cast<int64_t>(obj.list->size());
          if (idx < 0) idx += n;
          if (idx >= 0 && idx < n) return (*obj.list)[idx];
        } else {
          const std::u32string u = to_u32(obj.s);
          const int64_t n = static_cast<int64_t>(u.size());
          if (idx < 0) idx += n;
          if (idx >= 0 && idx < n) {
            Value c = Value::str(from_u32(std::u32string_view(u).substr(idx, 1)));
            c.markup = obj.markup;
            return c;
          }
        }
        return Value::undefined(object_desc(obj) + " has no element " + std::to_string(key.i));
      }
      break;
    }
    case Value::Type::kDict:
      if (const Value* v = dict_find(*obj.dict, key)) return *v;
      break;
    default: break;
  }
  if (key.is_string()) return get_attr(obj, key.s, line);
  return Value::undefined(object_desc(obj) + " has no element " + py_repr(key));
}

// Slices bypass jinja2's forgiving getitem (they compile to a plain Python subscript), so every
// misuse is an error rather than undefined.
Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step, int line) {
  if (obj.is_undefined()) undefined_error(obj, line);
  if (!(obj.is_string() || (obj.is_list() && !obj.generator))) {
    fail_line(line, "'" + py_type_name(obj) + "' object is not subscriptable");
  }
  auto bound = [&](const Value& v) -> std::optional<int64_t> {
    if ((v.is_undefined() && v.s == "<absent>") || v.is_none()) return std::nullopt;
    if (!v.is_int_like()) fail_line(line, "slice indices must be integers or None or have an __index__ method");
    return v.i;
  };
  const auto a = bound(start), b = bound(stop), c = bound(step);
  if (c && *c == 0) fail_line(line, "slice step cannot be zero");
  if (obj.is_list()) {
    ValueList out;
    for (int64_t k : slice_positions(static_cast<int64_t>(obj.list->size()), a, b, c.value_or(1))) out.push_back((*obj.list)[k]);
    return Value::make_list(std::move(out), obj.tuple);
  }
  const std::u32string u = to_u32(obj.s);
  std::u32string out;
  for (int64_t k : slice_positions(static_cast<int64_t>(u.size()), a, b, c.value_or(1))) out += u[k];
  Value r = Value::str(from_u32(out));
  r.markup = obj.markup;
  return r;
}

// make_attrgetter: "a.b.0" looked up item by item; "0" parts are integers.
Value attr_path(const Value& item, const Value& attribute, const Value* def, int line) {
  std::vector<Value> parts;
  if (attribute.is_string()) {
    size_t start = 0;
    while (true) {
      const size_t dot = attribute.s.find('.', start);
      std::string part = attribute.s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
      int64_t index = 0;
      const bool in_range = digits && std::from_chars(part.data(), part.data() + part.size(), index).ec == std::errc();
      if (digits && !in_range) fail_line(line, "integer too large: " + part);
      parts.push_back(digits ? Value::integer(index) : Value::str(part));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
  } else {
    parts.push_back(attribute);
  }
  Value v = item;
  for (const auto& p : parts) {
    v = get_item(v, p, line);
    if (def && !def->is_none() && v.is_undefined()) v = *def;
  }
  return v;
}

}  // namespace ftune::tok::jinja
