// libFuzzer target for SentencePiece models: the input is written as <dir>/tokenizer.model (with
// no tokenizer.json beside it) and loaded with Tokenizer::load, then a fixed string is encoded and
// decoded. libsentencepiece itself is not instrumented; ftune's backend around it is.
// Run: sentencepiece_fuzz tests/fuzz/corpus/sentencepiece tests/fuzz/seeds/sentencepiece
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ftune::fuzz::ScratchDir dir("sentencepiece");
  ftune::fuzz::write_bytes(dir.path() / "tokenizer.model", data, size);
  try {
    const auto t = ftune::tok::Tokenizer::load(dir.path());
    static const std::string fixed = "Hello world!  caf\xC3\xA9 \xE4\xB8\xAD 12345\n<s> x</s>";
    for (bool special : {false, true}) {
      const auto ids = t.encode(fixed, special);
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
  } catch (const ftune::Error&) {
  }
  return 0;
}
