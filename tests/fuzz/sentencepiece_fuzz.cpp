// libFuzzer target for SentencePiece models: the input is written as <dir>/tokenizer.model (with
// no tokenizer.json beside it) and loaded with Tokenizer::load, then a fixed string is encoded and
// decoded. libsentencepiece itself is not instrumented; ftune's backend around it is.
// Run: sentencepiece_fuzz tests/fuzz/corpus/sentencepiece tests/fuzz/seeds/sentencepiece
#include <cstdint>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer_checks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ftune::fuzz::ScratchDir dir("sentencepiece");
  ftune::fuzz::write_bytes(dir.path() / "tokenizer.model", data, size);
  try {
    const auto t = ftune::tok::Tokenizer::load(dir.path());
    ftune::fuzz::check_encodes(t, "Hello world!  caf\xC3\xA9 \xE4\xB8\xAD 12345\n<s> x</s>");
  } catch (const ftune::Error&) {
  }
  return 0;
}
