// LoRA as PEFT defines it (../shared/REFERENCE.md §2): low-rank adapters injected into the named
// linear modules of a built model, whose base parameters are then frozen. A [r, in] is
// kaiming-uniform(a = sqrt(5)), B [out, r] is zero, so an injected model computes exactly what the
// base did; the output gains scale * B(A(dropout(x))), scale = alpha / r (alpha / sqrt(r) with
// rsLoRA). Adapters are fp32 on the model's device whatever the base dtype (bf16, or NF4).
// Defines LoraOptions, kLinearModules, resolve_targets, apply_lora, merge_lora and the adapter
// queries.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "model/llama.h"

namespace ftune::lora {

// The linear modules of a Llama decoder layer that can carry an adapter.
inline const std::vector<std::string> kLinearModules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"};

struct LoraOptions {
  int64_t r = 8;          // rank
  double alpha = 8;       // scale numerator (PEFT's lora_alpha)
  double dropout = 0;     // dropout on the adapter input during training
  std::vector<std::string> targets = {"q_proj", "v_proj"};  // PEFT's default for Llama; or
                                                            // "all-linear"
  bool rslora = false;    // scale alpha / sqrt(r) instead of alpha / r
};

// Expands "all-linear" and checks each name against kLinearModules; errors start with `origin`.
// Returns the module names in kLinearModules order, without duplicates.
std::vector<std::string> resolve_targets(const std::vector<std::string>& targets,
                                         const std::string& origin);

// The adapter scale for these options.
double lora_scale(const LoraOptions& o);

// Freezes every base parameter (requires_grad false) and injects an adapter into each target
// linear of each decoder layer, initialized as PEFT does from `seed`. The model must not already
// carry adapters.
void apply_lora(model::LlamaForCausalLM& m, const LoraOptions& o, uint64_t seed);

// The same for the decoder linears whose module path ("model.layers.0.self_attn.q_proj") `select`
// accepts (o.targets is not consulted): for adapters that cover only some layers. Unlike
// apply_lora it accepts any rank, also one above a module's dims, as PEFT does.
void apply_lora_to(model::LlamaForCausalLM& m, const LoraOptions& o, uint64_t seed,
                   const std::function<bool(const std::string&)>& select);

// Whether `m` carries adapters.
bool has_lora(model::LlamaForCausalLM& m);

// The options the adapters of `m` were injected with (targets resolved, in kLinearModules order).
LoraOptions lora_options_of(model::LlamaForCausalLM& m);

// The adapter parameters by model name (model.layers.0.self_attn.q_proj.lora_A.weight, ...), in
// named_parameters() order. PEFT's file key is "base_model.model." + this name.
std::vector<std::pair<std::string, at::Tensor>> adapter_parameters(model::LlamaForCausalLM& m);

// Folds every adapter into its base weight, W += scale * B @ A (computed in fp32, stored in W's
// dtype, as PEFT's merge_and_unload), then removes the adapters: afterwards `m` is a plain model
// (has_lora false, named_parameters() the base's alone) that save_model writes as usual.
// Returns the number of linears merged.
int64_t merge_lora(model::LlamaForCausalLM& m);

// Every (module name, Linear) of the decoder layers' linears, e.g. ("model.layers.0.mlp.up_proj",
// ...), in named_modules() order.
std::vector<std::pair<std::string, model::Linear>> decoder_linears(model::LlamaForCausalLM& m);

}  // namespace ftune::lora
