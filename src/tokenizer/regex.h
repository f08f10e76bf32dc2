// PCRE2 (UTF + UCP, JIT) wrapper standing in for the Oniguruma regexes HF tokenizers uses.
// Patterns like GPT-2's and Llama 3's need \p{L}, \p{N}, scoped (?i:...) and lookahead, which
// PCRE2 supports with the same meaning; iteration follows onig's find_iter (an empty match right
// after the previous match is skipped). One compiled pattern is shared read-only across threads;
// match data and the JIT stack are per thread.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ftune::tok {

class Regex {
 public:
  // Compiles `pattern`; throws ftune::Error "regex /<pattern>/: <reason> at offset N".
  explicit Regex(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the non-overlapping matches [start, end) in `s` (valid UTF-8), left to right.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;
  // Whether the pattern matches anywhere in `s`.
  bool search(std::string_view s) const;
  const std::string& pattern() const { return pattern_; }

 private:
  // Returns true and sets [start, end) for the first match at or after `from`.
  bool match_from(std::string_view s, size_t from, size_t& start, size_t& end) const;
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace ftune::tok
