// libFuzzer target for the PEFT adapter loader: the input is adapter_config.json, the separator
// line "\n#safetensors#\n", then adapter_model.safetensors (no separator: a config only). Both are
// written into a scratch dir and loaded with load_adapter into a fresh tiny Llama (2 layers,
// hidden 16), which must succeed or throw ftune::Error.
// Run: adapter_fuzz tests/fuzz/corpus/adapter tests/fuzz/seeds/adapter
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "fuzz_util.h"
#include "lora/adapter.h"
#include "model/llama.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ftune::fuzz::ScratchDir dir("adapter");
  static const ftune::model::LlamaConfig config = [] {
    ftune::model::LlamaConfig c;
    c.vocab_size = 50;
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.max_position_embeddings = 32;
    return c;
  }();
  constexpr std::string_view kSeparator = "\n#safetensors#\n";
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t cut = in.find(kSeparator);
  const std::string_view cfg = in.substr(0, cut);
  ftune::fuzz::write_bytes(dir.path() / ftune::lora::kAdapterConfigFile, std::string(cfg));
  const auto weights = dir.path() / ftune::lora::kAdapterWeightsFile;
  if (cut == std::string_view::npos) {
    std::filesystem::remove(weights);
  } else {
    ftune::fuzz::write_bytes(weights, std::string(in.substr(cut + kSeparator.size())));
  }
  try {
    ftune::model::LlamaForCausalLM m(config);
    ftune::lora::load_adapter(dir.path(), m);
  } catch (const ftune::Error&) {
  }
  return 0;
}
