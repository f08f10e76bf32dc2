// Leftmost-longest, non-overlapping matching of added/special token strings in text, the way HF
// tokenizers' AhoCorasick (MatchKind::LeftmostLongest) and transformers' Trie find them.
// Candidates are bucketed by first byte and tried longest first: special-token sets are small
// (tens to a few thousand strings), so this beats building an automaton and is easy to verify.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace ftune::tok {

class AddedMatcher {
 public:
  // Adds `pattern` -> `id`; the first of several identical patterns wins; empty ones are ignored.
  // Call finish() after the last add() and before next().
  void add(std::string pattern, int64_t id) {
    if (pattern.empty() || !seen_.insert(pattern).second) return;
    buckets_[static_cast<unsigned char>(pattern[0])].emplace_back(std::move(pattern), id);
    empty_ = false;
  }
  void finish() {
    for (auto& bucket : buckets_) {
      std::stable_sort(bucket.begin(), bucket.end(), [](const auto& a, const auto& b) {
        return a.first.size() > b.first.size();
      });
    }
  }
  bool empty() const { return empty_; }

  // Finds the leftmost match at or after `from`, the longest one there: sets [start, end), id.
  bool next(std::string_view s, size_t from, size_t& start, size_t& end, int64_t& id) const {
    for (size_t i = from; i < s.size(); ++i) {
      for (const auto& [pattern, pid] : buckets_[static_cast<unsigned char>(s[i])]) {
        if (s.compare(i, pattern.size(), pattern) == 0) {
          start = i;
          end = i + pattern.size();
          id = pid;
          return true;
        }
      }
    }
    return false;
  }

 private:
  std::array<std::vector<std::pair<std::string, int64_t>>, 256> buckets_;  // longest first
  std::unordered_set<std::string> seen_;
  bool empty_ = true;
};

}  // namespace ftune::tok
