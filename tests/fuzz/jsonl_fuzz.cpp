// libFuzzer target for the JSONL dataset reader. The first input byte picks the format (text,
// alpaca, chat: byte % 3), the rest is the .jsonl file, read with a byte-level tokenizer (ids =
// UTF-8 bytes, <s> </s> <pad> = 256-258, a ChatML template). It must load or throw ftune::Error,
// and every example it returns must have one label per id, each label either -100 or its id, and
// every id inside the vocabulary.
// Run: jsonl_fuzz tests/fuzz/corpus/jsonl tests/fuzz/seeds/jsonl
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "data/dataset.h"
#include "fuzz_util.h"
#include "model/hf_io.h"
#include "tokenizer/tokenizer.h"

namespace {

struct Fixture {
  ftune::fuzz::ScratchDir dir{"jsonl"};
  ftune::tok::Tokenizer tokenizer = [this] {
    ftune::model::write_byte_level_tokenizer(dir.path() / "tok");
    return ftune::tok::Tokenizer::load(dir.path() / "tok");
  }();
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture f;
  if (size == 0) return 0;
  using ftune::data::Format;
  constexpr Format kFormats[] = {Format::kText, Format::kAlpaca, Format::kChat};
  const Format format = kFormats[data[0] % 3];
  const auto path = f.dir.path() / "data.jsonl";
  ftune::fuzz::write_bytes(path, data + 1, size - 1);
  std::vector<ftune::data::Example> examples;
  try {
    examples = ftune::data::load_jsonl(path, format, f.tokenizer);
  } catch (const ftune::Error&) {
    return 0;
  }
  const int64_t vocab = f.tokenizer.vocab_size();
  for (const auto& ex : examples) {
    bool ok = ex.ids.size() == ex.labels.size();
    for (size_t i = 0; ok && i < ex.ids.size(); ++i) {
      ok = ex.ids[i] >= 0 && ex.ids[i] < vocab &&
           (ex.labels[i] == ftune::data::kIgnoreIndex || ex.labels[i] == ex.ids[i]);
    }
    if (!ok) {
      std::fprintf(stderr, "example with inconsistent ids/labels (%zu ids, %zu labels)\n",
                   ex.ids.size(), ex.labels.size());
      std::abort();
    }
  }
  return 0;
}
