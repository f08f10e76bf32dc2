// Streamed export of a trained model; see export.h.
#include "train/export.h"

#include <map>
#include <memory>

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
  // The headers are written at the first unit, inside the strategy's walk, so their dtypes are
  // the ones it exports in (FSDP's mixed precision exports its fp32 masters, not bf16 copies).
  if (lora::has_lora(m)) {
    std::unique_ptr<io::SafetensorsStreamWriter> w;
    strategy.for_each_unit_gathered(m, [&](int64_t u) {
      if (!w) {
        w = std::make_unique<io::SafetensorsStreamWriter>(
            dir / lora::kAdapterWeightsFile, lora::adapter_weight_specs(m),
            std::map<std::string, std::string>{{"format", "pt"}});
      }
      for (const auto& [name, t] : lora::adapter_weights(m, u)) w->write(name, t);
    });
    w->finish();
    lora::save_adapter_config(dir, m, base_model);
  } else {
    std::unique_ptr<io::WeightsStreamWriter> w;
    strategy.for_each_unit_gathered(m, [&](int64_t u) {
      if (!w) {
        w = std::make_unique<io::WeightsStreamWriter>(dir, model::model_weight_specs(m),
                                                      max_shard_bytes);
        model::save_model_config(dir, m);
      }
      for (const auto& [name, t] : model::model_weights(m, u)) w->write(name, t);
    });
    w->finish();
  }
}

}  // namespace ftune::train
