// The parameter/memory report of a run, counted by hand from the tiny preset's shape: full
// fine-tuning (nothing frozen), LoRA on an fp32 base and on a bf16 base (2 bytes a base weight),
// through LoraStrategy (only adapters reach the optimizer).
#include <gtest/gtest.h>

#include "lora/lora.h"
#include "model/config.h"
#include "model/llama.h"
#include "train/lora_strategy.h"
#include "train/report.h"

namespace ftune {
namespace {

model::LlamaForCausalLM tiny() {
  model::LlamaForCausalLM m(model::preset_config("tiny"));
  model::init_weights(m, 0);
  return m;
}

TEST(ParamReport, FullFineTuningHasNoFrozenBase) {
  auto m = tiny();
  train::SingleDevice single;
  optim::AdamW opt(single.prepare(m), {});
  const train::ParamReport r = train::param_report(m, opt);
  const int64_t n = model::preset_config("tiny").num_parameters();
  EXPECT_EQ(r.trainable, n);
  EXPECT_EQ(r.total, n);
  EXPECT_EQ(r.base_bytes, 0);
  EXPECT_EQ(r.trainable_bytes, 4 * n);
  // exp_avg and exp_avg_sq in fp32, and one int64 step per parameter tensor.
  EXPECT_EQ(r.optimizer_bytes, 8 * n + 8 * static_cast<int64_t>(opt.params().size()));
}

TEST(ParamReport, LoraCountsAdaptersAsTrainableAndTheBaseInItsDtype) {
  const model::LlamaConfig c = model::preset_config("tiny");
  const int64_t n = c.num_parameters();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    auto m = tiny();
    m->to(dtype);
    lora::LoraOptions o;
    o.r = 2;
    o.targets = {"all-linear"};
    train::SingleDevice single;
    train::LoraStrategy strategy(single, o, 0);
    optim::AdamW opt(strategy.prepare(m), {});
    int64_t adapters = 0;
    for (const auto& [name, p] : lora::adapter_parameters(m)) adapters += p.numel();
    const int64_t q = c.num_attention_heads * c.dim_head();
    const int64_t kv = c.num_key_value_heads * c.dim_head();
    const int64_t h = c.hidden_size, f = c.intermediate_size;
    const int64_t per_layer = o.r * ((h + q) + (h + kv) * 2 + (q + h) + (h + f) * 2 + (f + h));
    ASSERT_EQ(adapters, per_layer * c.num_hidden_layers);
    EXPECT_EQ(static_cast<int64_t>(opt.params().size()), 2 * 7 * c.num_hidden_layers);
    const train::ParamReport r = train::param_report(m, opt);
    EXPECT_EQ(r.trainable, adapters);
    EXPECT_EQ(r.total, n + adapters);
    EXPECT_EQ(r.base_bytes, n * (dtype == at::kFloat ? 4 : 2));
    EXPECT_EQ(r.trainable_bytes, 4 * adapters);  // adapters stay fp32 on a bf16 base
    EXPECT_EQ(r.optimizer_bytes, 8 * adapters + 8 * static_cast<int64_t>(opt.params().size()));
    EXPECT_NE(train::format_param_report(r).find("parameters: " + std::to_string(adapters) +
                                                 " trainable of " + std::to_string(n + adapters)),
              std::string::npos);
  }
}

}  // namespace
}  // namespace ftune
