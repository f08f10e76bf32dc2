// BpeModel (see bpe.h): HF tokenizers' merge_word + Word::merge_all, including its quirks
// (byte_fallback does not flush a pending unk; duplicate merges keep the last rank), because any
// deviation changes ids on some input. Cost is O(n log n) per word, so a whole paragraph given
// as one word (Llama 2 style, no pre-tokenizer) stays fast.
#include "tokenizer/bpe.h"

#include <cstdio>
#include <queue>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {

BpeModel::BpeModel(std::unordered_map<std::string, int32_t> vocab,
                   const std::vector<std::pair<std::string, std::string>>& merges,
                   BpeOptions options, const std::string& origin)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  for (const auto& [token, id] : vocab_) {
    FTUNE_CHECK(id >= 0, origin, ": model.vocab: token '", token, "' has negative id ", id);
    max_id_ = std::max(max_id_, id);
  }
  vocab_r_.assign(static_cast<size_t>(max_id_ + 1), nullptr);
  for (const auto& [token, id] : vocab_) vocab_r_[id] = &token;

  const size_t prefix_len =
      options_.continuing_subword_prefix ? options_.continuing_subword_prefix->size() : 0;
  merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [a, b] = merges[rank];
    auto ia = vocab_.find(a);
    auto ib = vocab_.find(b);
    FTUNE_CHECK(ia != vocab_.end(), origin, ": model.merges[", rank, "]: token '", a,
                "' is not in model.vocab");
    FTUNE_CHECK(ib != vocab_.end(), origin, ": model.merges[", rank, "]: token '", b,
                "' is not in model.vocab");
    std::string merged = a;
    merged.append(b.size() >= prefix_len ? b.substr(prefix_len) : b);
    auto im = vocab_.find(merged);
    FTUNE_CHECK(im != vocab_.end(), origin, ": model.merges[", rank, "]: merged token '", merged,
                "' is not in model.vocab");
    merges_[pair_key(ia->second, ib->second)] = Merge{static_cast<int32_t>(rank), im->second};
  }
  if (options_.unk_token) {
    auto it = vocab_.find(*options_.unk_token);
    if (it != vocab_.end()) unk_id_ = it->second;
  }
  if (options_.byte_fallback) {
    byte_ids_.assign(256, -1);
    char name[8];
    for (int b = 0; b < 256; ++b) {
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = vocab_.find(name);
      if (it != vocab_.end()) byte_ids_[b] = it->second;
    }
  }
}

std::optional<int32_t> BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || id > max_id_) return nullptr;
  return vocab_r_[id];
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (options_.ignore_merges) {
    auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    auto it = cache_.find(std::string(word));
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  merge_word(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= kCacheMaxWords) cache_.clear();
    cache_.emplace(std::string(word), std::move(ids));
  }
}

void BpeModel::merge_word(std::string_view w, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // neighbour indices, -1 at the ends
    int32_t len;         // bytes covered; 0 marks a symbol merged into its left neighbour
  };
  std::vector<Symbol> symbols;
  symbols.reserve(w.size());
  auto add = [&](int32_t id, int32_t len) {
    const auto n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back(Symbol{id, n - 1, -1, len});
  };

  // Split into characters, mapping each to a vocab id, <0xNN> bytes, or unk.
  std::optional<std::pair<int32_t, int32_t>> unk;  // pending (unk id, byte length)
  std::string s;
  size_t i = 0;
  while (i < w.size()) {
    const size_t start = i;
    utf8_next(w, i);
    const bool is_first = start == 0, is_last = i == w.size();
    const auto byte_len = static_cast<int32_t>(i - start);
    s.assign(w.substr(start, i - start));
    if (!is_first && options_.continuing_subword_prefix)
      s.insert(0, *options_.continuing_subword_prefix);
    if (is_last && options_.end_of_word_suffix) s.append(*options_.end_of_word_suffix);

    auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      if (unk) {
        add(unk->first, unk->second);
        unk.reset();
      }
      add(it->second, byte_len);
      continue;
    }
    if (options_.byte_fallback) {
      bool all = true;
      for (unsigned char b : s) all = all && byte_ids_[b] >= 0;
      if (all) {
        for (unsigned char b : s) add(byte_ids_[b], 1);
        continue;
      }
    }
    if (options_.unk_token) {
      FTUNE_CHECK(unk_id_.has_value(), "BPE model: unk_token '", *options_.unk_token,
                  "' is not in the vocab");
      if (unk && options_.fuse_unk) {
        unk->second += byte_len;
      } else {
        if (unk) add(unk->first, unk->second);
        unk = std::make_pair(*unk_id_, byte_len);
      }
    }
    // Without an unk token, HF drops the character silently.
  }
  if (unk) add(unk->first, unk->second);

  // Merge loop: the lowest rank first, the leftmost position on ties; stale entries are skipped.
  struct Candidate {
    int32_t pos, rank, new_id;
  };
  auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later);
  for (size_t k = 0; k + 1 < symbols.size(); ++k) {
    auto it = merges_.find(pair_key(symbols[k].id, symbols[k + 1].id));
    if (it != merges_.end())
      queue.push(Candidate{static_cast<int32_t>(k), it->second.rank, it->second.new_id});
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const int32_t next_pos = cur.next;
    const Symbol right = symbols[next_pos];
    auto it = merges_.find(pair_key(cur.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      auto ip = merges_.find(pair_key(symbols[cur.prev].id, cur.id));
      if (ip != merges_.end()) queue.push(Candidate{cur.prev, ip->second.rank, ip->second.new_id});
    }
    if (cur.next >= 0) {
      auto in = merges_.find(pair_key(cur.id, symbols[cur.next].id));
      if (in != merges_.end()) queue.push(Candidate{top.pos, in->second.rank, in->second.new_id});
    }
  }
  for (const Symbol& sym : symbols) {
    if (sym.len != 0) out.push_back(sym.id);
  }
}

}  // namespace ftune::tok
