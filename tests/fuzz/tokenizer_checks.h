// What tokenizer_json_fuzz and sentencepiece_fuzz require of a tokenizer that loaded: every id it
// gives indexes its vocabulary, and the ids decode (special tokens kept and skipped).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace ftune::fuzz {

inline void check_encodes(const tok::Tokenizer& t, std::string_view text) {
  for (bool special : {false, true}) {
    const std::vector<int64_t> ids = t.encode(text, special);
    for (int64_t id : ids) {
      if (id < 0 || id >= t.vocab_size()) {
        std::fprintf(stderr, "encode gave id %lld outside the vocabulary (%lld)\n",
                     static_cast<long long>(id), static_cast<long long>(t.vocab_size()));
        std::abort();
      }
    }
    (void)t.decode(ids, false);
    (void)t.decode(ids, true);
  }
}

}  // namespace ftune::fuzz
