// libFuzzer target for tokenizer.json: the input is written as <dir>/tokenizer.json and loaded
// with Tokenizer::load. A tokenizer that loads must encode a fixed multilingual string and a slice
// of the input (as text, special tokens matched and not), giving ids inside its vocabulary, and
// decode them again; anything but success or ftune::Error is a finding.
// Run: tokenizer_json_fuzz tests/fuzz/corpus/tokenizer_json tests/fuzz/seeds/tokenizer_json
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"

namespace {

void check_ids(const ftune::tok::Tokenizer& t, const std::vector<int64_t>& ids) {
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

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ftune::fuzz::ScratchDir dir("tokenizer_json");
  ftune::fuzz::write_bytes(dir.path() / "tokenizer.json", data, size);
  try {
    const auto t = ftune::tok::Tokenizer::load(dir.path());
    static const std::string fixed =
        "Hello world!  caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80 12345\n\t<s> x</s>";
    check_ids(t, t.encode(fixed, false));
    check_ids(t, t.encode(fixed, true));
    // The last 64 bytes of the input as text (invalid UTF-8 included: encode must cope or throw).
    const size_t n = size < 64 ? size : 64;
    const std::string_view slice(reinterpret_cast<const char*>(data) + size - n, n);
    check_ids(t, t.encode(slice, false));
    check_ids(t, t.encode(slice, true));
  } catch (const ftune::Error&) {
  }
  return 0;
}
