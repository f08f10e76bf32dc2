// The BPE model of HF tokenizers: vocab, ranked merges, byte_fallback, unk handling and the
// priority-queue merge loop (lowest rank first, leftmost on ties), reproduced step for step so
// ids match exactly. A bounded per-word cache makes natural text cheap: most words repeat.
// Defines BpeOptions (the tokenizer.json `model` fields) and BpeModel.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace ftune::tok {

struct BpeOptions {
  std::optional<std::string> unk_token;                  // emitted for characters not in vocab
  std::optional<std::string> continuing_subword_prefix;  // e.g. "##" (rare in BPE files)
  std::optional<std::string> end_of_word_suffix;         // e.g. "</w>"
  bool fuse_unk = false;       // consecutive unknown characters become one unk token
  bool byte_fallback = false;  // unknown characters become <0xNN> byte tokens when present
  bool ignore_merges = false;  // a word already in vocab is one token (Llama 3)
};

class BpeModel {
 public:
  // `merges` are (left, right) token strings in rank order. Throws ftune::Error prefixed by
  // `origin` when a merge names a token missing from the vocab.
  BpeModel(std::unordered_map<std::string, int32_t> vocab,
           const std::vector<std::pair<std::string, std::string>>& merges, BpeOptions options,
           const std::string& origin);

  // Appends the ids of one pre-tokenized word (already in the model's alphabet).
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;  // nullptr when the id is not in vocab
  int64_t size() const { return static_cast<int64_t>(vocab_.size()); }
  int32_t max_id() const { return max_id_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<const std::string*> vocab_r_;  // id -> token (points into vocab_ keys)
  std::unordered_map<uint64_t, Merge> merges_;
  BpeOptions options_;
  std::optional<int32_t> unk_id_;
  std::vector<int32_t> byte_ids_;  // <0xNN> token ids for byte_fallback, -1 when missing
  int32_t max_id_ = -1;

  // word -> ids; guarded because encode() is const and may run on several threads.
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
  static constexpr size_t kCacheMaxWords = 100000;
  static constexpr size_t kCacheMaxWordBytes = 256;
};

}  // namespace ftune::tok
