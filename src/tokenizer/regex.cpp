// PCRE2-backed Regex (see regex.h). JIT-compiled when the platform allows; a per-thread JIT stack
// of 1 MiB covers long runs of whitespace that `\s+(?!\S)` backtracks over, and the interpreter
// takes over if the JIT still reports a resource limit.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/regex.h"

#include <pcre2.h>

#include <memory>

#include "core/error.h"

namespace ftune::tok {

namespace {

struct MatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  MatchState() {
    data = pcre2_match_data_create(16, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, nullptr);
    if (context && jit_stack) pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~MatchState() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(jit_stack);
  }
};

MatchState& match_state() {
  thread_local MatchState state;
  return state;
}

}  // namespace

Regex::Regex(const std::string& pattern) : pattern_(pattern) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    fail("regex /", pattern, "/: ", reinterpret_cast<const char*>(message), " at offset ", offset);
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // best effort: falls back to the interpreter
  code_ = code;
}

Regex::~Regex() {
  pcre2_code_free(static_cast<pcre2_code*>(code_));
}

bool Regex::match_from(std::string_view s, size_t from, size_t& start, size_t& end) const {
  MatchState& state = match_state();
  auto* code = static_cast<pcre2_code*>(code_);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  int rc =
      pcre2_match(code, subject, s.size(), from, PCRE2_NO_UTF_CHECK, state.data, state.context);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
    rc = pcre2_match(code, subject, s.size(), from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, state.data,
                     state.context);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(rc, message, sizeof(message));
    fail("regex /", pattern_, "/: matching failed: ", reinterpret_cast<const char*>(message));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.data);
  start = ovector[0];
  end = ovector[1];
  return true;
}

void Regex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  size_t last_end = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  while (last_end <= s.size()) {
    size_t start = 0, end = 0;
    if (!match_from(s, last_end, start, end)) return;
    if (start == end && have_last && last_match_end == end) {
      // onig's find_iter: no empty match right after the previous one; step one character.
      if (last_end >= s.size()) return;
      size_t step = 1;
      while (last_end + step < s.size() &&
             (static_cast<unsigned char>(s[last_end + step]) & 0xC0) == 0x80)
        ++step;
      last_end += step;
      continue;
    }
    last_end = end;
    last_match_end = end;
    have_last = true;
    out.emplace_back(start, end);
    if (start == end && end == s.size()) return;
  }
}

bool Regex::search(std::string_view s) const {
  size_t start = 0, end = 0;
  return match_from(s, 0, start, end);
}

}  // namespace ftune::tok
