// The globals a chat template can call (see builtins.h): jinja2's range, dict and namespace,
// and transformers' raise_exception (which ends the render with the template's message) and
// strftime_now (local time, as datetime.now().strftime). Trade-off: range() keeps the
// sandbox's MAX_RANGE of 100000 items, so a template cannot allocate without bound.
#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/chat_template/builtins.h"
#include "tokenizer/chat_template/evaluator.h"

namespace ftune::tok::jinja {

namespace {

std::string strftime_now(const std::string& fmt) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() % 1000000;
  std::tm tm{};
  localtime_r(&t, &tm);
  // datetime.strftime handles %f, %z and %Z itself (a naive datetime has no zone).
  std::string f;
  for (size_t k = 0; k < fmt.size(); ++k) {
    if (fmt[k] == '%' && k + 1 < fmt.size()) {
      const char c = fmt[k + 1];
      if (c == 'f') {
        char b[16];
        std::snprintf(b, sizeof b, "%06lld", static_cast<long long>(micros));
        f += b;
      } else if (c == 'z' || c == 'Z') {
      } else {
        f += fmt.substr(k, 2);
      }
      ++k;
    } else {
      f += fmt[k];
    }
  }
  if (f.empty()) return "";
  std::vector<char> buf(256 + f.size() * 16);
  const size_t n = std::strftime(buf.data(), buf.size(), f.c_str(), &tm);
  return std::string(buf.data(), n);
}

}  // namespace

ScopePtr make_globals() {
  auto g = std::make_shared<Scope>();
  g->vars["raise_exception"] = Value::function("raise_exception", [](CallArgs& a) -> Value {
    const Value msg = a.get_or(0, "message", Value::none());
    fail("chat template: ", py_str(msg));
  });
  g->vars["strftime_now"] = Value::function("strftime_now", [](CallArgs& a) -> Value {
    const Value* f = a.get(0, "format");
    if (!f || !f->is_string()) fail_line(a.line, "strftime_now() needs a format string");
    return Value::str(strftime_now(f->s));
  });
  g->vars["range"] = Value::function("range", [](CallArgs& a) -> Value {
    if (!a.kw.empty()) fail_line(a.line, "range() takes no keyword arguments");
    if (a.pos.empty() || a.pos.size() > 3) fail_line(a.line, "range expected 1 to 3 arguments");
    for (const auto& x : a.pos) {
      if (!x.is_int_like()) fail_line(a.line, "'" + py_type_name(x) + "' object cannot be interpreted as an integer");
    }
    int64_t start = 0, stop, step = 1;
    if (a.pos.size() == 1) {
      stop = a.pos[0].i;
    } else {
      start = a.pos[0].i;
      stop = a.pos[1].i;
      if (a.pos.size() == 3) step = a.pos[2].i;
    }
    if (step == 0) fail_line(a.line, "range() arg 3 must not be zero");
    ValueList out;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (out.size() >= 100000) fail_line(a.line, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
      out.push_back(Value::integer(k));
    }
    return Value::make_list(std::move(out));
  });
  auto make_mapping = [](CallArgs& a, const char* what) {
    if (a.pos.size() > 1) fail_line(a.line, std::string(what) + " expected at most 1 argument");
    ValueDict d;
    if (!a.pos.empty()) {
      const Value& src = a.pos[0];
      if (src.is_dict()) {
        d = *src.dict;
      } else {
        for (const auto& pair : iterate(src, a.line)) {
          const ValueList kv = iterate(pair, a.line);
          if (kv.size() != 2) fail_line(a.line, std::string(what) + ": sequence elements must have length 2");
          dict_set(d, kv[0], kv[1]);
        }
      }
    }
    for (const auto& [k, x] : a.kw) dict_set(d, Value::str(k), x);
    return d;
  };
  g->vars["dict"] = Value::function("dict", [make_mapping](CallArgs& a) {
    return Value::make_dict(make_mapping(a, "dict"));
  });
  g->vars["namespace"] = Value::function("namespace", [make_mapping](CallArgs& a) {
    auto o = std::make_shared<Object>();
    o->type_name = "Namespace";
    o->assignable = true;
    for (auto& [k, x] : make_mapping(a, "namespace")) {
      if (!k.is_string()) fail_line(a.line, "namespace keywords must be strings");
      o->set(k.s, x);
    }
    Value v;
    v.type = Value::Type::kObject;
    v.obj = o;
    return v;
  });
  return g;
}

}  // namespace ftune::tok::jinja
