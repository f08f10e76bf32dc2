// Test driver for tests/python/test_tokenizer.py, for what `ftune tokenize` does not print:
//  batch  encodes and decodes many texts in one process (so the oracle comparison stays fast);
//         each input line is {"text": "..."}, each output line
//         {"ids": [...], "ids_special": [...], "decoded": "...", "decoded_keep_special": "..."};
//  info   vocab size, bos/eos/pad and chat template of a model dir, as JSON;
//  chat   apply_chat_template on a JSON messages file, printed as a JSON string.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace {

void run_batch(const std::string& model, const std::string& input) {
  const auto tokenizer = ftune::tok::Tokenizer::load(model);
  std::ifstream in(input);
  FTUNE_CHECK(in.good(), input, ": cannot open");
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto request = nlohmann::json::parse(line);
    const std::string text = request.at("text").get<std::string>();
    nlohmann::json reply;
    const auto ids = tokenizer.encode(text, false);
    reply["ids"] = ids;
    reply["ids_special"] = tokenizer.encode(text, true);
    reply["decoded"] = tokenizer.decode(ids, true);
    reply["decoded_keep_special"] = tokenizer.decode(ids, false);
    std::cout << reply.dump() << "\n";
  }
}

void run_info(const std::string& model) {
  const auto t = ftune::tok::Tokenizer::load(model);
  nlohmann::json info;
  info["vocab_size"] = t.vocab_size();
  info["bos_id"] = t.bos_id() ? nlohmann::json(*t.bos_id()) : nlohmann::json();
  info["eos_id"] = t.eos_id() ? nlohmann::json(*t.eos_id()) : nlohmann::json();
  info["pad_id"] = t.pad_id() ? nlohmann::json(*t.pad_id()) : nlohmann::json();
  info["bos_token"] = t.bos_token();
  info["eos_token"] = t.eos_token();
  info["chat_template"] = t.chat_template();
  std::cout << info.dump() << "\n";
}

void run_chat(const std::string& model, const std::string& messages_file,
              bool add_generation_prompt) {
  const auto t = ftune::tok::Tokenizer::load(model);
  std::ifstream in(messages_file);
  FTUNE_CHECK(in.good(), messages_file, ": cannot open");
  const auto messages = nlohmann::ordered_json::parse(in);
  std::cout << nlohmann::json(t.apply_chat_template(messages, add_generation_prompt)).dump()
            << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tokenizer test driver"};
  app.require_subcommand(1);
  std::string model, input;
  bool add_generation_prompt = false;
  auto* batch = app.add_subcommand("batch", "Encode/decode JSON lines {\"text\": ...}");
  batch->add_option("--model", model, "Model directory")->required();
  batch->add_option("--input", input, "JSON-lines file")->required();
  batch->callback([&] { run_batch(model, input); });
  auto* info =
      app.add_subcommand("info", "Print vocab size, bos/eos/pad and chat template as JSON");
  info->add_option("--model", model, "Model directory")->required();
  info->callback([&] { run_info(model); });
  auto* chat = app.add_subcommand("chat", "Render the chat template for a JSON messages file");
  chat->add_option("--model", model, "Model directory")->required();
  chat->add_option("--messages", input, "JSON file with [{role, content}, ...]")->required();
  chat->add_flag("--add-generation-prompt", add_generation_prompt, "Append the assistant header");
  chat->callback([&] { run_chat(model, input, add_generation_prompt); });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenize_tool: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
