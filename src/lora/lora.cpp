// LoRA injection, initialization and adapter queries; see lora.h.
#include "lora/lora.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/hf_io.h"

namespace ftune::lora {

std::vector<std::string> resolve_targets(const std::vector<std::string>& targets,
                                         const std::string& origin) {
  FTUNE_CHECK(!targets.empty(), origin, ": expected at least one module name (",
              "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear)");
  std::vector<bool> on(kLinearModules.size(), false);
  for (const auto& t : targets) {
    if (t == "all-linear") {
      std::fill(on.begin(), on.end(), true);
      continue;
    }
    auto it = std::find(kLinearModules.begin(), kLinearModules.end(), t);
    FTUNE_CHECK(it != kLinearModules.end(), origin, ": unknown module '", t, "': expected ",
                "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear");
    on[it - kLinearModules.begin()] = true;
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < on.size(); ++i) {
    if (on[i]) out.push_back(kLinearModules[i]);
  }
  return out;
}

double lora_scale(const LoraOptions& o) {
  const double r = static_cast<double>(o.r);
  return o.rslora ? o.alpha / std::sqrt(r) : o.alpha / r;
}

std::vector<std::pair<std::string, model::Linear>> decoder_linears(model::LlamaForCausalLM& m) {
  std::vector<std::pair<std::string, model::Linear>> out;
  for (const auto& item : m->named_modules()) {
    const std::string& name = item.key();
    if (name.rfind("model.layers.", 0) != 0 || name.find(".lora_") != std::string::npos) continue;
    auto lin = std::dynamic_pointer_cast<model::LinearImpl>(item.value());
    if (lin) out.emplace_back(name, model::Linear(lin));
  }
  return out;
}

namespace {

// The leaf name of a module path: "model.layers.3.mlp.up_proj" -> "up_proj".
std::string leaf(const std::string& name) { return name.substr(name.rfind('.') + 1); }

}  // namespace

void apply_lora(model::LlamaForCausalLM& m, const LoraOptions& o, uint64_t seed) {
  const std::vector<std::string> targets = resolve_targets(o.targets, "lora.targets");
  auto select = [&](const std::string& name) {
    return std::find(targets.begin(), targets.end(), leaf(name)) != targets.end();
  };
  // PEFT accepts any rank; a rank above the dims of a module is almost surely a typo in a config.
  for (auto& [name, lin] : decoder_linears(m)) {
    if (!select(name)) continue;
    FTUNE_CHECK(o.r <= std::min(lin->in_features(), lin->out_features()), "lora.r: ", o.r,
                " exceeds the dims of ", name, " [", lin->out_features(), ", ",
                lin->in_features(), "]");
  }
  apply_lora_to(m, o, seed, select);
}

void apply_lora_to(model::LlamaForCausalLM& m, const LoraOptions& o, uint64_t seed,
                   const std::function<bool(const std::string&)>& select) {
  FTUNE_CHECK(o.r > 0, "lora.r: expected a positive rank, got ", o.r);
  FTUNE_CHECK(!has_lora(m), "apply_lora: the model already carries adapters");
  for (auto& p : m->parameters()) p.requires_grad_(false);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double scale = lora_scale(o);
  for (auto& [name, lin] : decoder_linears(m)) {
    if (!select(name)) continue;
    const auto dev = lin->device();
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(dev);
    const int64_t in = lin->in_features(), out = lin->out_features();
    auto a = std::make_shared<model::LinearImpl>(in, o.r, false, opts);   // weight [r, in]
    auto b = std::make_shared<model::LinearImpl>(o.r, out, false, opts);  // weight [out, r]
    {
      torch::NoGradGuard no_grad;
      // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2 / (1 + 5)), bound gain*sqrt(3/in).
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      at::Tensor cpu = at::empty({o.r, in}, at::kFloat).uniform_(-bound, bound, gen);
      a->weight.copy_(cpu);
      b->weight.zero_();
    }
    lin->lora_A = lin->register_module("lora_A", a);
    lin->lora_B = lin->register_module("lora_B", b);
    lin->lora_scale = scale;
    lin->lora_dropout = o.dropout;
    lin->lora_alpha = o.alpha;
    lin->lora_rslora = o.rslora;
  }
}

int64_t merge_lora(model::LlamaForCausalLM& m) {
  // A 4-bit base has no dense weight to add to: dequantize it (bitsandbytes' values) into the
  // dtype the rest of the model keeps, as merging a QLoRA adapter does in PEFT.
  if (model::has_nf4_linears(m)) model::dequantize_linears(m, m->lm_head_weight().scalar_type());
  torch::NoGradGuard no_grad;
  int64_t merged = 0;
  for (auto& [name, lin] : decoder_linears(m)) {
    if (!lin->lora_A) continue;
    FTUNE_CHECK(lin->weight.defined(), "merge: ", name, ": the base weight is not dense");
    // PEFT's get_delta_weight: (B @ A) * scaling, in fp32; then weight += delta in W's dtype.
    const at::Tensor a = lin->lora_A->weight.to(at::kFloat), b = lin->lora_B->weight.to(at::kFloat);
    const at::Tensor delta = at::matmul(b, a) * lin->lora_scale;  // [out, in]
    lin->weight.copy_(lin->weight.to(at::kFloat) + delta.to(lin->weight.device()));
    lin->unregister_module("lora_A");
    lin->unregister_module("lora_B");
    lin->lora_A = nullptr;
    lin->lora_B = nullptr;
    lin->lora_scale = lin->lora_dropout = lin->lora_alpha = 0;
    lin->lora_rslora = false;
    ++merged;
  }
  return merged;
}

bool has_lora(model::LlamaForCausalLM& m) {
  for (auto& [name, lin] : decoder_linears(m)) {
    if (lin->lora_A) return true;
  }
  return false;
}

LoraOptions lora_options_of(model::LlamaForCausalLM& m) {
  LoraOptions o;
  std::vector<std::string> names;
  bool found = false;
  for (auto& [name, lin] : decoder_linears(m)) {
    if (!lin->lora_A) continue;
    if (!found) {
      o.r = lin->lora_A->weight.size(0);
      o.alpha = lin->lora_alpha;
      o.dropout = lin->lora_dropout;
      o.rslora = lin->lora_rslora;
      found = true;
    }
    names.push_back(leaf(name));
  }
  FTUNE_CHECK(found, "lora_options_of: the model carries no adapters");
  o.targets = resolve_targets(names, "lora.targets");
  return o;
}

std::vector<std::pair<std::string, at::Tensor>> adapter_parameters(model::LlamaForCausalLM& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : m->named_parameters()) {
    if (p.key().find(".lora_") != std::string::npos) out.emplace_back(p.key(), p.value());
  }
  return out;
}

}  // namespace ftune::lora
