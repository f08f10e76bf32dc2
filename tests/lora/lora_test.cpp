// Pure logic of src/lora: PEFT's target_modules matching, adapter_config.json refusals, module
// selection on a tiny model, merge_lora (same forward as unmerged, adapters gone), and the
// adapter-file checks that run before anything is allocated.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include <unistd.h>

#include "core/error.h"
#include "lora/adapter.h"

namespace ftune::lora {
namespace {
namespace fs = std::filesystem;

model::LlamaForCausalLM tiny_model() {
  model::LlamaConfig c;
  c.vocab_size = 50;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 32;
  model::LlamaForCausalLM m(c);
  model::init_weights(m, 1);
  return m;
}

// One temp dir per process, removed at exit.
struct TempRoot {
  fs::path path = fs::temp_directory_path() / ("lora_test_" + std::to_string(::getpid()));
  ~TempRoot() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

fs::path write_config(const std::string& json) {
  static TempRoot root;
  static int n = 0;
  fs::path dir = root.path / std::to_string(n++);
  fs::create_directories(dir);
  std::ofstream(dir / kAdapterConfigFile) << json;
  return dir;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModuleMatcher, NamesMatchAsPeft) {
  ModuleMatcher m;
  m.names = {"q_proj", "model.layers.1.mlp.up_proj"};
  EXPECT_TRUE(m.matches("model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(m.matches("model.layers.1.mlp.up_proj"));
  EXPECT_FALSE(m.matches("model.layers.0.mlp.up_proj"));
  EXPECT_FALSE(m.matches("model.layers.0.self_attn.xq_proj"));
  ModuleMatcher r;
  r.is_regex = true;
  r.regex = R"(model\.layers\.1\..*(q|v)_proj)";
  EXPECT_TRUE(r.matches("model.layers.1.self_attn.v_proj"));
  EXPECT_FALSE(r.matches("model.layers.0.self_attn.v_proj"));
  EXPECT_FALSE(r.matches("xmodel.layers.1.self_attn.v_proj"));  // fullmatch, not search
}

TEST(AdapterConfig, ReadsPeftFields) {
  auto c = read_adapter_config(write_config(
      R"({"peft_type":"LORA","r":4,"lora_alpha":16,"lora_dropout":0.1,"use_rslora":true,)"
      R"("target_modules":["v_proj","q_proj"],"exclude_modules":null,"rank_pattern":{},)"
      R"("bias":"none","use_dora":false,"modules_to_save":null})"));
  EXPECT_EQ(c.options.r, 4);
  EXPECT_EQ(c.options.alpha, 16);
  EXPECT_DOUBLE_EQ(c.options.dropout, 0.1);
  EXPECT_TRUE(c.options.rslora);
  EXPECT_EQ(c.targets.names, (std::vector<std::string>{"v_proj", "q_proj"}));
  EXPECT_FALSE(c.exclude.is_regex);
  EXPECT_TRUE(c.exclude.names.empty());
}

TEST(AdapterConfig, RefusesWhatFtuneDoesNotCompute) {
  const std::string base = R"({"peft_type":"LORA","r":4,"target_modules":["q_proj"],)";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("use_dora":true})", "use_dora: true is not supported"},
      {R"("bias":"all"})", "bias: \"all\" is not supported"},
      {R"("lora_bias":true})", "lora_bias: true is not supported"},
      {R"("fan_in_fan_out":true})", "fan_in_fan_out: true is not supported"},
      {R"("rank_pattern":{"q_proj":8}})", "rank_pattern: {\"q_proj\":8} is not supported"},
      {R"("layers_to_transform":[0]})", "layers_to_transform: [0] is not supported"},
      {R"("modules_to_save":["lm_head"]})", "modules_to_save: [\"lm_head\"] is not supported"},
      {R"("lora_dropout":1.5})", "lora_dropout: expected a number in [0, 1)"},
      {R"("use_qalora":true})", "use_qalora: true is not supported"},
      {R"("layers_pattern":"layers"})", "layers_pattern: \"layers\" is not supported"},
      {R"("trainable_token_indices":[3]})", "trainable_token_indices: [3] is not supported"},
      {R"("layer_replication":[[0,1]]})", "layer_replication: [[0,1]] is not supported"},
      {R"("target_parameters":["w"]})", "target_parameters: [\"w\"] is not supported"},
      {R"("megatron_config":{"a":1}})", "megatron_config: {\"a\":1} is not supported"},
      {R"("alpha_pattern":{"q_proj":2}})", "alpha_pattern: {\"q_proj\":2} is not supported"},
  };
  for (const auto& [tail, want] : cases) {
    const std::string err = error_of([&] { read_adapter_config(write_config(base + tail)); });
    EXPECT_NE(err.find(want), std::string::npos) << tail << " -> " << err;
    EXPECT_NE(err.find("adapter_config.json"), std::string::npos) << err;
  }
  EXPECT_NE(error_of([] { read_adapter_config(write_config(R"({"peft_type":"IA3","r":4})")); })
                .find("peft_type: expected \"LORA\""),
            std::string::npos);
  // Found by adapter_fuzz (seeds/adapter/crash-peft-type-not-a-string.adapter): nlohmann's
  // type_error escaped instead of this line.
  EXPECT_NE(error_of([] { read_adapter_config(write_config(R"({"peft_type":["q_proj"],"r":4})")); })
                .find("adapter_config.json: peft_type: expected \"LORA\", got [\"q_proj\"]"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              read_adapter_config(write_config(R"({"peft_type":"LORA","r":0,"target_modules":[]})"));
            }).find("r: expected a positive integer"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              read_adapter_config(
                  write_config(R"J({"peft_type":"LORA","r":2,"target_modules":"(?P<x>q)"})J"));
            }).find("is not a regex ftune can read"),
            std::string::npos);
  EXPECT_NE(error_of([] { read_adapter_config(fs::temp_directory_path() / "no-such-adapter"); })
                .find("not a directory"),
            std::string::npos);
}

TEST(SelectModules, PeftSemantics) {
  auto m = tiny_model();
  auto cfg = [](const std::string& targets, const std::string& extra = "") {
    return read_adapter_config(write_config(R"({"peft_type":"LORA","r":2,"target_modules":)" +
                                            targets + extra + "}"));
  };
  auto sel = [&](const AdapterConfig& c) { return select_adapter_modules(c, m, "cfg"); };
  EXPECT_EQ(sel(cfg(R"(["q_proj"])")),
            (std::vector<std::string>{"model.layers.0.self_attn.q_proj",
                                      "model.layers.1.self_attn.q_proj"}));
  EXPECT_EQ(sel(cfg(R"("all-linear")")).size(), 14u);  // 7 linears x 2 layers, not lm_head
  EXPECT_EQ(sel(cfg(R"(".*\\.1\\..*_proj")")).size(), 7u);
  EXPECT_EQ(sel(cfg(R"(["q_proj","v_proj"])", R"(,"exclude_modules":["model.layers.0.self_attn.v_proj"])"))
                .size(),
            3u);
  EXPECT_NE(error_of([&] { sel(cfg(R"(["c_attn"])")); }).find("'c_attn' matches no module"),
            std::string::npos);
  EXPECT_NE(error_of([&] { sel(cfg(R"(["q_proj","lm_head"])")); })
                .find("selects lm_head, which ftune cannot adapt"),
            std::string::npos);
  EXPECT_NE(error_of([&] { sel(cfg(R"(["mlp"])")); }).find("selects model.layers.0.mlp,"),
            std::string::npos);
  EXPECT_NE(error_of([&] { sel(cfg(R"(["embed_tokens"])")); })
                .find("selects model.embed_tokens, which ftune cannot adapt"),
            std::string::npos);
  EXPECT_NE(error_of([&] { sel(cfg(R"(".*norm")")); }).find("cannot adapt"), std::string::npos);
  EXPECT_NE(error_of([&] { sel(cfg(R"("nothing\\.here")")); }).find("selects no module"),
            std::string::npos);
}

// Found by adapter_fuzz (tests/fuzz/seeds/adapter/crash-huge-rank.adapter): load_adapter
// allocated adapters of adapter_config.json's r before looking at the weights file, so r =
// 2000000000 exhausted memory. The file's shapes are now checked first.
TEST(LoadAdapter, ConfigRankIsCheckedAgainstTheFileBeforeAllocating) {
  auto m = tiny_model();
  LoraOptions o;
  o.r = 2;
  o.targets = {"q_proj"};
  apply_lora(m, o, 3);
  const fs::path dir = write_config("{}");
  save_adapter(dir, m, "tiny");
  auto good = tiny_model();
  load_adapter(dir, good);  // as saved: loads
  EXPECT_TRUE(has_lora(good));
  std::ifstream in(dir / kAdapterConfigFile);
  std::string cfg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto at = cfg.find("\"r\": 2,");
  ASSERT_NE(at, std::string::npos) << cfg;
  std::ofstream(dir / kAdapterConfigFile) << cfg.replace(at, 7, "\"r\": 2000000000,");
  auto fresh = tiny_model();
  const std::string err = error_of([&] { load_adapter(dir, fresh); });
  EXPECT_NE(err.find("adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj"
                     ".lora_A.weight: shape [2, 16] has rank 2, but adapter_config.json says r = "
                     "2000000000"),
            std::string::npos) << err;
  EXPECT_FALSE(has_lora(fresh));  // refused before any adapter was injected
}

TEST(Merge, SameLogitsAndNoAdaptersLeft) {
  auto m = tiny_model();
  LoraOptions o;
  o.r = 3;
  o.alpha = 5;
  o.targets = {"all-linear"};
  apply_lora(m, o, 7);
  {
    torch::NoGradGuard ng;
    for (auto& [name, p] : adapter_parameters(m)) p.normal_(0, 0.3);
  }
  m->eval();
  at::Tensor ids = at::randint(0, 50, {2, 9}, at::kLong);
  torch::NoGradGuard ng;
  const at::Tensor before = m->forward(ids);
  EXPECT_EQ(merge_lora(m), 14);
  EXPECT_FALSE(has_lora(m));
  EXPECT_TRUE(adapter_parameters(m).empty());
  for (const auto& p : m->named_parameters()) EXPECT_EQ(p.key().find("lora"), std::string::npos);
  const at::Tensor after = m->forward(ids);
  EXPECT_LT((after - before).abs().max().item<double>(), 1e-5);
  EXPECT_GT((before).abs().max().item<double>(), 0.1);
}

}  // namespace
}  // namespace ftune::lora
