// Test driver for tests/python/test_data.py: loads a JSONL dataset with ftune's tokenizer and
// prints the tokenized examples as JSON, so Python can compare them with what HF tokenizers and
// transformers' apply_chat_template give for the same tokenizer directory.
//   data_tool TOKENIZER_DIR FILE FORMAT   ->  {"examples": [{"ids": [...], "labels": [...]}, ...]}
// Errors print one line to stderr and exit 1, like the ftune binary.
#include <nlohmann/json.hpp>

#include <iostream>

#include "core/error.h"
#include "data/dataset.h"

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: data_tool TOKENIZER_DIR FILE text|alpaca|chat\n";
    return 2;
  }
  try {
    auto tokenizer = ftune::tok::Tokenizer::load(argv[1]);
    auto format = ftune::data::parse_format(argv[3], "format");
    nlohmann::json out = {{"examples", nlohmann::json::array()}};
    for (const auto& ex : ftune::data::load_jsonl(argv[2], format, tokenizer)) {
      out["examples"].push_back({{"ids", ex.ids}, {"labels", ex.labels}});
    }
    std::cout << out.dump() << "\n";
  } catch (const ftune::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
