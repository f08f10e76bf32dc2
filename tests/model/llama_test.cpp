// Unit tests for the model's construction and size checks: parameter_shapes(config) is exactly
// what the built model registers; construction allocates without writing (no random init); a
// config whose sizes overflow or exceed RAM is one error naming the field; and an activation-
// checkpointed graph keeps its layers alive after the model handle is dropped.
#include "model/llama.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "core/error.h"
#include "model/loss.h"

namespace {
using ftune::model::LlamaConfig;
using ftune::model::LlamaForCausalLM;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ftune::Error& e) {
    return e.what();
  }
  return "(no error)";
}

int64_t rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

LlamaConfig tiny() { return ftune::model::preset_config("tiny"); }

TEST(LlamaTest, ParameterShapesMatchTheBuiltModel) {
  std::vector<LlamaConfig> configs(4, tiny());
  configs[1].tie_word_embeddings = true;
  configs[2].attention_bias = true;
  configs[2].mlp_bias = true;
  configs[3].head_dim = 8;
  configs[3].num_hidden_layers = 3;
  for (const LlamaConfig& c : configs) {
    LlamaForCausalLM m(c, at::TensorOptions().device(at::kMeta));
    auto params = m->named_parameters();
    auto shapes = ftune::model::parameter_shapes(c);
    ASSERT_EQ(params.size(), shapes.size());
    int64_t numel = 0;
    for (size_t i = 0; i < shapes.size(); ++i) {
      EXPECT_EQ(params[i].key(), shapes[i].first);
      EXPECT_EQ(params[i].value().sizes().vec(), shapes[i].second) << shapes[i].first;
      EXPECT_TRUE(params[i].value().is_meta());
      numel += params[i].value().numel();
    }
    EXPECT_EQ(numel, c.num_parameters());
  }
}

TEST(LlamaTest, ConstructionAllocatesWithoutWriting) {
  // tinyllama-1.1b in fp32 is 4.4 GB of parameters: a random init would make them all resident.
  LlamaConfig c = ftune::model::preset_config("tinyllama-1.1b");
  at::ones({8}).sum();
  const int64_t before = rss_bytes();
  LlamaForCausalLM m(c);
  const int64_t grown = rss_bytes() - before;
  std::printf("construction of %lld fp32 parameters grew RSS by %lld bytes\n",
              static_cast<long long>(c.num_parameters()), static_cast<long long>(grown));
  EXPECT_LT(grown, int64_t{64} << 20);
  EXPECT_EQ(m->model->layers->size(), 22u);
}

TEST(LlamaTest, OverflowingSizeNamesTheField) {
  LlamaConfig c = tiny();
  c.num_hidden_layers = int64_t{1} << 62;
  EXPECT_EQ(error_of([&] { c.validate("d/config.json"); }),
            "d/config.json: num_hidden_layers: 4611686018427387904 makes the model's byte count "
            "overflow int64");
  c = tiny();
  c.vocab_size = int64_t{1} << 60;
  EXPECT_EQ(error_of([&] { c.validate("d/config.json"); }),
            "d/config.json: vocab_size: 1152921504606846976 makes the model's byte count "
            "overflow int64");
}

TEST(LlamaTest, ModelLargerThanMemoryNamesTheField) {
  LlamaConfig c = tiny();
  c.intermediate_size = int64_t{1} << 40;
  c.validate("x");
  const int64_t need = c.num_parameters() * 2;
  char expect[256];
  std::snprintf(expect, sizeof(expect),
                "d/config.json: intermediate_size: model needs %.1f GB in bfloat16, more than "
                "this machine's %.1f GB",
                need / 1e9, ftune::model::physical_memory_bytes() / 1e9);
  EXPECT_EQ(error_of([&] { c.check_fits_in_memory(at::kBFloat16, "d/config.json"); }), expect);
  // The constructor refuses it too, before allocating.
  EXPECT_NE(error_of([&] { LlamaForCausalLM m(c, at::kBFloat16); }).find("config: intermediate_size: model needs"),
            std::string::npos);
  c.num_hidden_layers = int64_t{1} << 30;
  c.intermediate_size = 172;
  EXPECT_NE(error_of([&] { c.check_fits_in_memory(at::kFloat, "d"); }).find("d: num_hidden_layers: model needs"),
            std::string::npos);
}

TEST(LlamaTest, CheckpointedGraphOwnsItsLayers) {
  at::manual_seed(0);
  LlamaConfig c = tiny();
  at::Tensor ids = at::randint(c.vocab_size, {2, 16}, at::kLong);
  auto grads_of = [&](bool drop_model) {
    LlamaForCausalLM m(c);
    ftune::model::init_weights(m, 3);
    m->set_grad_checkpointing(true);
    at::Tensor w = m->model->layers->ptr<ftune::model::LlamaDecoderLayerImpl>(0)->mlp->up_proj->weight;
    auto loss = ftune::model::causal_lm_loss_sum(m->forward(ids), ids);
    if (drop_model) m = LlamaForCausalLM(nullptr);  // only the graph holds the layers now
    loss.sum.backward();
    return w.grad().clone();
  };
  at::Tensor kept = grads_of(false), dropped = grads_of(true);
  ASSERT_TRUE(kept.defined() && dropped.defined());
  EXPECT_TRUE(at::equal(kept, dropped));
  EXPECT_GT(kept.abs().sum().item<double>(), 0.0);
}

}  // namespace
