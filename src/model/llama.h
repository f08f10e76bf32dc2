// LlamaForCausalLM in LibTorch, parameter-for-parameter the transformers model: RMSNorm, RoPE
// (rope_theta, llama3/linear scaling), grouped-query attention through
// at::scaled_dot_product_attention, SwiGLU MLP, tied or untied embeddings, fp32 or bf16 weights,
// optional per-layer activation checkpointing and a KV cache for generation.
// Parameters are registered under the HF names (model.layers.0.self_attn.q_proj.weight, ...), so
// named_parameters() is the checkpoint's key set and LoRA/FSDP can address layers by those names.
// Construction allocates parameters uninitialized (at::empty in the given dtype and device; the
// meta device allocates nothing), so a load writes each weight exactly once; init_weights is the
// only initializer.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <vector>

#include "model/config.h"
#include "quant/nf4.h"

namespace ftune::model {

// Per-layer key/value cache for incremental decoding.
struct KvCache {
  std::vector<at::Tensor> k, v;  // per layer: [B, n_kv_heads, T_past, head_dim]
  int64_t length() const { return k.empty() || !k[0].defined() ? 0 : k[0].size(2); }
};

// Optional inputs that packed batches and generation need.
struct ForwardOptions {
  at::Tensor positions;  // [B, T] int64; default arange(T_past, T_past + T)
  at::Tensor attn_mask;  // [B, 1, T, T_past + T] bool, true = may attend; default causal
  KvCache* cache = nullptr;  // appended to when given
};

// nn.Linear without torch::nn::Linear's kaiming init: weight [out, in] and bias [out] (undefined
// when absent) are allocated uninitialized in `opts`. A LoRA adapter (lora::apply_lora) adds
// lora_scale * lora_B(lora_A(dropout(x))) to the output; A and B are registered as the submodules
// "lora_A" and "lora_B", so their parameters carry PEFT's names (...q_proj.lora_A.weight).
// A 4-bit linear (QLoRA's frozen base) holds its weight in `nf4` instead: `weight` is then
// undefined and not a parameter, and forward computes quant::nf4_linear.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x);
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  // Where the base weight lives (the dense weight's device, or the NF4 tensors').
  at::Device device() const;
  // Makes this a 4-bit linear: drops the dense `weight` parameter; matmuls run in compute_dtype.
  // A bias still on the meta device (built for loading) gets uninitialized storage in bias_opts.
  void set_nf4(std::shared_ptr<quant::Nf4Tensor> w, at::ScalarType compute_dtype,
               const at::TensorOptions& bias_opts = {});
  // Makes this a dense linear again with `w` [out, in] as the registered `weight` parameter
  // (frozen when it replaces an NF4 weight); drops `nf4`. A meta bias gets storage like `w`.
  void set_dense_weight(const at::Tensor& w);

  at::Tensor weight, bias;
  std::shared_ptr<quant::Nf4Tensor> nf4;  // the 4-bit weight; null for a dense linear
  at::ScalarType nf4_compute_dtype = at::kBFloat16;
  // LoRA: A [r, in], B [out, r] (fp32, trainable); null when this linear has no adapter.
  std::shared_ptr<LinearImpl> lora_A, lora_B;
  double lora_scale = 0;    // alpha / r, or alpha / sqrt(r) with rsLoRA
  double lora_dropout = 0;  // dropout probability on the adapter's input (training only)
  double lora_alpha = 0;    // as configured, for adapter_config.json
  bool lora_rslora = false;

 private:
  void materialize_bias(const at::TensorOptions& opts);
  int64_t in_features_, out_features_;
};
TORCH_MODULE(Linear);

// Every parameter of the base model (HF names), without LoRA adapters: what a model dir holds.
std::vector<std::pair<std::string, at::Tensor>> base_parameters(torch::nn::Module& m);

// nn.Embedding (no padding_idx, no max_norm) with an uninitialized weight [num, dim].
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& ids) { return at::embedding(weight, ids); }
  at::Tensor weight;
};
TORCH_MODULE(Embedding);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps_;
};
TORCH_MODULE(RMSNorm);

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const LlamaConfig& c, const at::TensorOptions& opts);
  // x: [B, T, H]; cos/sin: [B, T, head_dim], sin with rotate_half's sign folded in:
  // cat(-sin[..., :hd/2], sin[..., hd/2:]) (hidden_states builds it once per forward)
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& attn_mask, at::Tensor* k_cache, at::Tensor* v_cache);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  int64_t n_heads_, n_kv_heads_, head_dim_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  LlamaMLPImpl(const LlamaConfig& c, const at::TensorOptions& opts);
  at::Tensor forward(const at::Tensor& x);
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  // The attention and MLP linears are built in `linear_opts` (default: `opts`); the meta device
  // there allocates nothing, for linears a loader turns into NF4 ones.
  LlamaDecoderLayerImpl(const LlamaConfig& c, const at::TensorOptions& opts,
                        std::optional<at::TensorOptions> linear_opts = std::nullopt);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& attn_mask, at::Tensor* k_cache = nullptr,
                     at::Tensor* v_cache = nullptr);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

class LlamaModelImpl : public torch::nn::Module {
 public:
  LlamaModelImpl(const LlamaConfig& c, const at::TensorOptions& opts,
                 std::optional<at::TensorOptions> linear_opts = std::nullopt);
  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

// FSDP's seam into the forward: the model is cut into units (unit_count: 0 = embed_tokens,
// 1..L = decoder layers, L + 1 = final norm + lm_head) and a strategy that shards parameters
// gathers a unit's before it runs. hidden_states calls before_unit(u) right before unit u
// computes and passes its output through after_unit(u, out) (which may register backward hooks
// on it and must return it, or a view of it). The head unit has no after_unit: its output is the
// final hidden state, and the loss's projection runs after hidden_states returns.
class UnitHooks {
 public:
  virtual ~UnitHooks() = default;
  virtual void before_unit(int64_t unit) = 0;
  virtual at::Tensor after_unit(int64_t unit, const at::Tensor& out) = 0;
};

// Units of a model with config `c` (num_hidden_layers + 2), and the unit a parameter belongs to
// by its name (HF or PEFT module name, adapters included): embed_tokens 0, model.layers.<i>.* i+1,
// model.norm and lm_head L+1. Throws for a name outside the model.
int64_t unit_count(const LlamaConfig& c);
int64_t unit_of(const std::string& name, const LlamaConfig& c);

class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  // Validates `c` and, for CPU tensors, checks that the weights fit in this machine's memory
  // (LlamaConfig::check_fits_in_memory with origin "config"); then allocates every parameter
  // uninitialized in `opts` (dtype and device; default fp32 on the CPU).
  // With `nf4_linears` the decoder layers' linear weights are placeholders on the meta device
  // (nothing allocated, no memory check for them): the caller (model::load_model) must give each
  // one its NF4 weight (LinearImpl::set_nf4) or a dense one before use.
  explicit LlamaForCausalLMImpl(const LlamaConfig& c, const at::TensorOptions& opts = at::kFloat,
                                bool nf4_linears = false);

  // Final hidden states after the last norm: [B, T, H].
  at::Tensor hidden_states(const at::Tensor& input_ids, const ForwardOptions& opts = {});
  // Units [first, end) of hidden_states (unit_count numbering; a pipeline stage's share): `input`
  // is input_ids [B, T] when first == 0, else the hidden state [B, T, H] unit first - 1 gave.
  // Returns the hidden state after unit end - 1 (after the final norm when end is unit_count).
  // opts.positions default to arange(T); the RoPE tables and mask follow x's device.
  at::Tensor run_units(const at::Tensor& input, const ForwardOptions& opts, int64_t first,
                       int64_t end);
  // Logits [B, T, V] in the weights' dtype, as transformers returns them.
  at::Tensor forward(const at::Tensor& input_ids, const ForwardOptions& opts = {});
  at::Tensor lm_head_weight() const;  // the tied embedding or lm_head.weight: [V, H]

  // Recompute each decoder layer in backward instead of storing its activations.
  void set_grad_checkpointing(bool on) { grad_checkpointing_ = on; }
  bool grad_checkpointing() const { return grad_checkpointing_; }
  // The hooks around each unit (null = none); the caller keeps them alive while set.
  void set_unit_hooks(UnitHooks* hooks) { unit_hooks_ = hooks; }
  const LlamaConfig& config() const { return config_; }
  // RoPE tables for positions [B, T]: cos, sin each [B, T, head_dim] in `dtype`.
  std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& positions, at::ScalarType dtype) const;

  LlamaModel model{nullptr};
  Linear lm_head{nullptr};  // null when embeddings are tied

 private:
  LlamaConfig config_;
  at::Tensor inv_freq_;  // [head_dim / 2] fp32, a buffer (not saved)
  bool grad_checkpointing_ = false;
  UnitHooks* unit_hooks_ = nullptr;
};
TORCH_MODULE(LlamaForCausalLM);

// Every parameter of LlamaForCausalLM(c), name and shape, in named_parameters() order, computed
// from the config alone (no module is built): what a checkpoint for `c` must hold.
std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const LlamaConfig& c);

// inv_freq as transformers computes it, including llama3/linear scaling: [head_dim / 2] fp32.
at::Tensor rope_inv_freq(const LlamaConfig& c);

// Initializes every weight as transformers' _init_weights does (normal(0, initializer_range) for
// linear and embedding weights, zeros for biases, ones for norms), from `seed`.
void init_weights(LlamaForCausalLM& m, uint64_t seed);

}  // namespace ftune::model
