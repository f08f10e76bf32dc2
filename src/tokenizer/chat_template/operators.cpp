// Python's arithmetic and string formatting for the chat-template interpreter (see value.h):
// + - * / // % ** on ints, floats, strings, lists and Markup, `fmt % args`, round() and
// int(float). Trade-off: Python ints are unbounded and ours are 64-bit, so every int result is
// overflow-checked and fails loudly instead of wrapping; `seq * n` is capped at 2^26 units.
#include "tokenizer/chat_template/value.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "tokenizer/unicode.h"

namespace ftune::tok::jinja {

// Python's `fmt % args` for the conversions templates use: %s %r %d %i %f %e %g %x %o %c %%.
std::string py_percent_format(const std::string& fmt, const Value& args, int line, bool escape_args) {
  // Like CPython: a tuple supplies the positional values; any other object is the single value,
  // and one with __getitem__ (dict, list, undefined) also counts as the mapping for %(name)s and
  // switches off the "not all arguments converted" check.
  ValueList items;
  const Value* mapping = nullptr;
  if (args.is_list() && args.tuple) {
    items = *args.list;
  } else {
    items.push_back(args);
    if (args.is_dict() || args.is_undefined() || (args.is_list() && !args.generator)) mapping = &args;
  }
  size_t next = 0;
  std::string out;
  for (size_t k = 0; k < fmt.size(); ++k) {
    if (fmt[k] != '%') {
      out += fmt[k];
      continue;
    }
    if (++k >= fmt.size()) fail_line(line, "incomplete format");
    const Value* arg = nullptr;
    if (fmt[k] == '(') {
      const size_t close = fmt.find(')', k);
      if (close == std::string::npos || !mapping) fail_line(line, "format requires a mapping");
      if (mapping->is_undefined()) undefined_error(*mapping, line);
      if (!mapping->is_dict()) fail_line(line, "list indices must be integers or slices, not str");
      arg = dict_find(*mapping->dict, Value::str(fmt.substr(k + 1, close - k - 1)));
      if (!arg) fail_line(line, "KeyError: " + py_str_repr(fmt.substr(k + 1, close - k - 1)));
      k = close + 1;
    }
    std::string flags;
    while (k < fmt.size() && std::string_view("-+ #0").find(fmt[k]) != std::string_view::npos) flags += fmt[k++];
    std::string width, prec;
    while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) width += fmt[k++];
    if (k < fmt.size() && fmt[k] == '.') {
      prec = ".";
      ++k;
      while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) prec += fmt[k++];
    }
    while (k < fmt.size() && (fmt[k] == 'l' || fmt[k] == 'h' || fmt[k] == 'L')) ++k;
    if (k >= fmt.size()) fail_line(line, "incomplete format");
    // Wider than kMaxStringBytes is refused anyway; this also keeps stoll/stoul below in range.
    if (width.size() > 9 || prec.size() > 10) fail_line(line, "format width or precision too large");
    const char conv = fmt[k];
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (!arg) {
      if (next >= items.size()) fail_line(line, "not enough arguments for format string");
      arg = &items[next++];
    }
    std::string piece;
    char buf[512];
    const std::string spec = "%" + flags + width + prec;
    switch (conv) {
      case 's':
      case 'r':
      case 'a': {
        piece = conv == 's' ? py_str(*arg) : py_repr(*arg);
        // Markup % x escapes what x turns into, unless x is Markup itself.
        if (escape_args && !(conv == 's' && arg->markup)) piece = html_escape(piece);
        if (prec.size() > 1) {
          const auto u = to_u32(piece);
          piece = from_u32(std::u32string_view(u).substr(0, std::stoul(prec.substr(1))));
        }
        const int64_t w = width.empty() ? 0 : std::stoll(width);
        piece = pad_str(piece, w, ' ', flags.find('-') != std::string::npos ? -1 : 1);
        break;
      }
      case 'd':
      case 'i':
      case 'u':
      case 'x':
      case 'X':
      case 'o':
      case 'c': {
        if (!arg->is_number()) fail_line(line, "%" + std::string(1, conv) + " format: a real number is required, not " + py_type_name(*arg));
        if (conv == 'c') {
          utf8_append(piece, static_cast<char32_t>(arg->is_int_like() ? arg->i : 0));
          break;
        }
        const long long v = arg->is_int_like() ? arg->i : static_cast<long long>(std::trunc(arg->f));
        std::snprintf(buf, sizeof buf, (spec + "ll" + (conv == 'i' || conv == 'u' ? 'd' : conv)).c_str(), v);
        piece = buf;
        break;
      }
      case 'f':
      case 'F':
      case 'e':
      case 'E':
      case 'g':
      case 'G': {
        if (!arg->is_number()) fail_line(line, "must be real number, not " + py_type_name(*arg));
        std::snprintf(buf, sizeof buf, (spec + conv).c_str(), arg->as_double());
        piece = buf;
        break;
      }
      default: fail_line(line, std::string("unsupported format character '") + conv + "'");
    }
    out += piece;
  }
  if (!mapping && next < items.size()) fail_line(line, "not all arguments converted during string formatting");
  return out;
}

namespace {

// Python ints are unbounded; ours are 64-bit and fail loudly instead of wrapping.
template <typename Op>
int64_t checked(Op op, int64_t a, int64_t b, int line) {
  int64_t r = 0;
  if (op(a, b, &r)) fail_line(line, "integer overflow: template integers are limited to 64 bits");
  return r;
}
bool add_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_add_overflow(a, b, r); }
bool sub_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_sub_overflow(a, b, r); }
bool mul_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_mul_overflow(a, b, r); }

}  // namespace

int64_t float_to_int(double f, int line) {
  if (std::isinf(f)) fail_line(line, "cannot convert float infinity to integer");
  if (!(std::fabs(f) < 9.2233720368547758e18)) fail_line(line, "integer overflow: template integers are limited to 64 bits");
  return static_cast<int64_t>(std::trunc(f));
}

Value binary_op(const std::string& op, const Value& a, const Value& b, int line) {
  if (op == "~") return Value::str(py_str(a) + py_str(b));
  if (op == "%" && a.is_string()) {
    std::string text = py_percent_format(a.s, b, line, a.markup);
    return a.markup ? Value::markup_str(std::move(text)) : Value::str(std::move(text));
  }
  if (a.is_undefined()) undefined_error(a, line);
  if (b.is_undefined()) undefined_error(b, line);
  const bool ints = a.is_int_like() && b.is_int_like();
  const bool nums = a.is_number() && b.is_number();
  auto unsupported = [&]() {
    fail_line(line, "unsupported operand type(s) for " + op + ": '" + py_type_name(a) + "' and '" +
                        py_type_name(b) + "'");
  };
  if (op == "+") {
    if (ints) return Value::integer(checked(add_ovf, a.i, b.i, line));
    if (nums) return Value::real(a.as_double() + b.as_double());
    if (a.is_string() && b.is_string()) {
      if (!a.markup && !b.markup) return Value::str(a.s + b.s);
      return Value::markup_str((a.markup ? a.s : html_escape(a.s)) + (b.markup ? b.s : html_escape(b.s)));
    }
    if (a.is_string()) fail_line(line, "can only concatenate str (not \"" + py_type_name(b) + "\") to str");
    if (a.is_list() && b.is_list() && !a.generator && !b.generator && a.tuple == b.tuple) {
      ValueList out = *a.list;
      out.insert(out.end(), b.list->begin(), b.list->end());
      return Value::make_list(std::move(out), a.tuple);
    }
    if (a.is_list() && !a.generator && b.is_list()) {
      fail_line(line, "can only concatenate " + py_type_name(a) + " (not \"" + py_type_name(b) + "\") to " + py_type_name(a));
    }
    unsupported();
  }
  if (op == "-") {
    if (ints) return Value::integer(checked(sub_ovf, a.i, b.i, line));
    if (nums) return Value::real(a.as_double() - b.as_double());
    unsupported();
  }
  if (op == "*") {
    if (ints) return Value::integer(checked(mul_ovf, a.i, b.i, line));
    if (nums) return Value::real(a.as_double() * b.as_double());
    const Value* seq = a.is_int_like() ? &b : &a;
    const Value* times = a.is_int_like() ? &a : &b;
    if (times->is_int_like() && (seq->is_string() || (seq->is_list() && !seq->generator))) {
      // Bytes per repetition: list items are copied, strings among them deeply.
      int64_t unit = seq->is_string() ? static_cast<int64_t>(seq->s.size()) : 0;
      if (seq->is_list()) {
        for (const auto& x : *seq->list) unit += static_cast<int64_t>(sizeof(Value) + (x.is_string() ? x.s.size() : 0));
      }
      if (times->i > 0 && unit > 0 && times->i > (int64_t{1} << 26) / unit) {
        fail_line(line, "repetition result too large");
      }
      if (seq->is_string()) {
        // By doubling: a byte-at-a-time loop took seconds for 64 MiB under the sanitizers.
        std::string out;
        const size_t total = times->i > 0 ? seq->s.size() * static_cast<size_t>(times->i) : 0;
        out.reserve(total);
        if (total > 0) out = seq->s;
        while (out.size() < total) out.append(out, 0, std::min(out.size(), total - out.size()));
        return seq->markup ? Value::markup_str(out) : Value::str(out);
      }
      ValueList out;
      for (int64_t k = 0; k < times->i; ++k) out.insert(out.end(), seq->list->begin(), seq->list->end());
      return Value::make_list(std::move(out), seq->tuple);
    }
    if (seq->is_string() || seq->is_list()) {
      fail_line(line, "can't multiply sequence by non-int of type '" + py_type_name(*times) + "'");
    }
    unsupported();
  }
  if (op == "/") {
    if (!nums) unsupported();
    if (b.as_double() == 0) fail_line(line, "division by zero");
    return Value::real(a.as_double() / b.as_double());
  }
  if (op == "//" || op == "%") {
    if (!nums) unsupported();
    if (ints) {
      if (b.i == 0) fail_line(line, "integer division or modulo by zero");
      int64_t q = a.i / b.i, r = a.i % b.i;
      if (r != 0 && ((r < 0) != (b.i < 0))) {
        --q;
        r += b.i;
      }
      return Value::integer(op == "//" ? q : r);
    }
    const double x = a.as_double(), y = b.as_double();
    if (y == 0) fail_line(line, op == "//" ? "float floor division by zero" : "float modulo");
    // CPython's float divmod.
    double mod = std::fmod(x, y);
    double div = (x - mod) / y;
    if (mod != 0) {
      if ((y < 0) != (mod < 0)) {
        mod += y;
        div -= 1.0;
      }
    } else {
      mod = std::copysign(0.0, y);
    }
    if (op == "%") return Value::real(mod);
    double fd;
    if (div != 0) {
      fd = std::floor(div);
      if (div - fd > 0.5) fd += 1.0;
    } else {
      fd = std::copysign(0.0, x / y);
    }
    return Value::real(fd);
  }
  if (op == "**") {
    if (ints && b.i >= 0) {
      int64_t r = 1, base = a.i;
      for (int64_t e = b.i; e > 0; e >>= 1) {  // square-and-multiply; stops at the first overflow
        if (e & 1) r = checked(mul_ovf, r, base, line);
        if (e > 1) base = checked(mul_ovf, base, base, line);
      }
      return Value::integer(r);
    }
    if (nums) return Value::real(std::pow(a.as_double(), b.as_double()));
    unsupported();
  }
  fail_line(line, "unknown operator " + op);
}

// Python's round(x, ndigits): correctly rounded, ties to even (printf rounds the exact binary
// value the same way).
Value py_round(const Value& v, int64_t precision, int line) {
  if (v.is_int_like()) {
    if (precision >= 0) return Value::integer(v.i);
    int64_t p = 1;
    for (int64_t k = 0; k < -precision; ++k) p *= 10;
    const double r = std::nearbyint(static_cast<double>(v.i) / static_cast<double>(p));
    return Value::integer(static_cast<int64_t>(r) * p);
  }
  if (v.type != Value::Type::kFloat) fail_line(line, "type " + py_type_name(v) + " doesn't define __round__ method");
  if (!std::isfinite(v.f)) return v;
  if (precision < 0) {
    const double p = std::pow(10.0, static_cast<double>(-precision));
    return Value::real(std::nearbyint(v.f / p) * p);
  }
  char buf[512];
  std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(std::min<int64_t>(precision, 300)), v.f);
  return Value::real(std::strtod(buf, nullptr));
}

}  // namespace ftune::tok::jinja
