// Streamed export of a trained model; see export.h.
#include "train/export.h"

#include "io/safetensors.h"
#include "lora/adapter.h"
#include "lora/lora.h"
#include "model/hf_io.h"

namespace ftune::train {
namespace fs = std::filesystem;

void save_trained_streamed(const fs::path& dir, model::LlamaForCausalLM& m,
                           const std::string& base_model, Strategy& strategy,
                           int64_t max_shard_bytes) {
  if (!strategy.is_main()) {
    strategy.for_each_unit_gathered(m, [](int64_t) {});  // the gathers need every rank
    return;
  }
  fs::create_directories(dir);
  if (lora::has_lora(m)) {
    io::SafetensorsStreamWriter w(dir / lora::kAdapterWeightsFile, lora::adapter_weight_specs(m),
                                  {{"format", "pt"}});
    strategy.for_each_unit_gathered(m, [&](int64_t u) {
      for (const auto& [name, t] : lora::adapter_weights(m, u)) w.write(name, t);
    });
    w.finish();
    lora::save_adapter_config(dir, m, base_model);
  } else {
    io::WeightsStreamWriter w(dir, model::model_weight_specs(m), max_shard_bytes);
    strategy.for_each_unit_gathered(m, [&](int64_t u) {
      for (const auto& [name, t] : model::model_weights(m, u)) w.write(name, t);
    });
    w.finish();
    model::save_model_config(dir, m);
  }
}

}  // namespace ftune::train
