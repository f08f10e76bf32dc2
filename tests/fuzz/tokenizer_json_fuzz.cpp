// libFuzzer target for tokenizer.json: the input is written as <dir>/tokenizer.json and loaded
// with Tokenizer::load. A tokenizer that loads must encode a fixed multilingual string and a slice
// of the input (as text, special tokens matched and not), giving ids inside its vocabulary, and
// decode them again; anything but success or ftune::Error is a finding.
// Run: tokenizer_json_fuzz tests/fuzz/corpus/tokenizer_json tests/fuzz/seeds/tokenizer_json
#include <cstdint>
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer_checks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ftune::fuzz::ScratchDir dir("tokenizer_json");
  ftune::fuzz::write_bytes(dir.path() / "tokenizer.json", data, size);
  try {
    const auto t = ftune::tok::Tokenizer::load(dir.path());
    ftune::fuzz::check_encodes(
        t, "Hello world!  caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80 12345\n\t<s> x</s>");
    // The last 64 bytes of the input as text (invalid UTF-8 included: encode must cope or throw).
    const size_t n = size < 64 ? size : 64;
    ftune::fuzz::check_encodes(t, std::string_view(reinterpret_cast<const char*>(data) + size - n, n));
  } catch (const ftune::Error&) {
  }
  return 0;
}
