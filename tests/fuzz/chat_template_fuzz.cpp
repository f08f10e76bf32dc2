// libFuzzer target for the chat-template (Jinja subset) interpreter: the input is the template
// source, rendered with a fixed three-message conversation, bos/eos tokens and
// add_generation_prompt. It must render or throw ftune::Error; the interpreter's own limits
// (recursion depth, range size, repetition size, output size) keep every input fast, so a
// libFuzzer timeout or out-of-memory here is a finding too.
// Run: chat_template_fuzz tests/fuzz/corpus/chat_template tests/fuzz/seeds/chat_template
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "core/error.h"
#include "tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nlohmann::ordered_json context = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are helpful."},
      {"role": "user", "content": "Hi there, caf\u00e9?"},
      {"role": "assistant", "content": "Hello! How can I help?"}
    ],
    "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": true,
    "tools": null, "documents": null
  })");
  try {
    (void)ftune::tok::render_chat_template(std::string(reinterpret_cast<const char*>(data), size),
                                           context);
  } catch (const ftune::Error&) {
  }
  return 0;
}
