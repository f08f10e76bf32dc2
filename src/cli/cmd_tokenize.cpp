// `ftune tokenize`: prints the token ids of a text as one JSON array line, without special tokens
// (HF `tokenizer(text, add_special_tokens=False)`). It is the quickest way to check that ftune
// and transformers agree on a model's tokenizer, and what the tokenizer tests drive.
// The text comes from a file (read as raw bytes, so newlines and trailing whitespace are kept)
// or from the command line; exactly one of the two is required.
#include <iostream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "tokenizer/tokenizer.h"

namespace ftune::cli {

namespace {

struct TokenizeArgs {
  std::string model;
  std::string text_file;
  std::string text;
};

void run_tokenize(const TokenizeArgs& a, bool from_file) {
  require_tokenizer_dir(a.model, "--model");
  if (!from_file) require_utf8(a.text, "tokenize", "--string");
  const std::string text = from_file ? read_text_file(a.text_file, "--text") : a.text;
  const tok::Tokenizer tokenizer = tok::Tokenizer::load(a.model);
  const std::vector<int64_t> ids = tokenizer.encode(text, /*add_special_tokens=*/false);
  std::cout << nlohmann::json(ids).dump() << "\n";
}

}  // namespace

void register_tokenize(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize",
      "Print the token ids of a text as a JSON array on one line (no special tokens added)");
  cmd->add_option("--model", args->model,
                  "Model directory holding tokenizer.json or tokenizer.model "
                  "(plus tokenizer_config.json)")
      ->required()
      ->type_name("DIR");
  CLI::Option_group* input = cmd->add_option_group("input", "The text to tokenize (exactly one)");
  CLI::Option* file = input->add_option(
      "--text", args->text_file, "File whose whole contents (UTF-8) are tokenized as one text");
  file->type_name("FILE");
  input->add_option("--string", args->text, "Literal text to tokenize")->type_name("TEXT");
  input->require_option(1);
  cmd->callback([args, file] { run_tokenize(*args, file->count() > 0); });
}

}  // namespace ftune::cli
