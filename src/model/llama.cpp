// LlamaForCausalLM forward pass, RoPE tables, activation checkpointing and weight init; see
// llama.h. Every op mirrors transformers' modeling_llama in order and dtype (RMSNorm in fp32 then
// cast back, RoPE tables computed in fp32 and cast to the activation dtype) so fp32 logits agree
// to ~1e-6 and bf16 ones to bf16 rounding.
#include "model/llama.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <cmath>

#include "core/error.h"
#include "model/autocast.h"

namespace ftune::model {
namespace {

// transformers' x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1). The sign is
// moved into the table once per forward (sin_signed = cat(-sin1, sin2), see hidden_states), so a
// layer swaps the halves with one roll instead of chunk + neg + cat, forward and backward; the
// products are bit for bit the same ((-a) * b == a * (-b) in IEEE arithmetic).
// q, k: [B, heads, T, hd]; cos/sin_signed: [B, T, hd]
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin_signed) {
  auto c = cos.unsqueeze(1), s = sin_signed.unsqueeze(1);
  return x * c + x.roll(x.size(-1) / 2, -1) * s;
}

// Recomputes one decoder layer during backward (reentrant checkpointing, as torch.utils.checkpoint
// with use_reentrant=True): forward stores only the layer input; backward replays the layer with
// grad enabled and backpropagates through it, which also accumulates the layer's weight grads.
// The layer and its non-differentiable inputs, passed outside the autograd arguments so that an
// undefined mask is not mistaken for a variable.
struct LayerCall {
  std::shared_ptr<LlamaDecoderLayerImpl> layer;
  at::Tensor cos, sin, mask;
};

// The autograd graph co-owns the layer it will replay: saved_data holds it in a capsule, so
// backward never reaches a layer freed after forward.
struct LayerCapsule : torch::CustomClassHolder {
  explicit LayerCapsule(std::shared_ptr<LlamaDecoderLayerImpl> l) : layer(std::move(l)) {}
  std::shared_ptr<LlamaDecoderLayerImpl> layer;
};

struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const LayerCall& call) {
    ctx->save_for_backward({x});
    ctx->saved_data["layer"] = at::IValue::make_capsule(c10::make_intrusive<LayerCapsule>(call.layer));
    ctx->saved_data["cos"] = call.cos;
    ctx->saved_data["sin"] = call.sin;
    ctx->saved_data["mask"] = call.mask;
    const auto dev = x.device().type();
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(dev);
    ctx->saved_data["autocast_dtype"] = at::autocast::get_autocast_dtype(dev);
    return call.layer->forward(x, call.cos, call.sin, call.mask);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto capsule = c10::static_intrusive_pointer_cast<LayerCapsule>(ctx->saved_data["layer"].toCapsule());
    at::Tensor x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    {
      torch::AutoGradMode enable(true);
      AutocastScope autocast(x.device().type(), ctx->saved_data["autocast"].toBool(),
                             ctx->saved_data["autocast_dtype"].toScalarType());
      at::Tensor out = capsule->layer->forward(x, ctx->saved_data["cos"].toTensor(),
                                               ctx->saved_data["sin"].toTensor(),
                                               ctx->saved_data["mask"].toTensor());
      torch::autograd::backward({out}, {grad_out[0]});
    }
    return {x.grad(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rope_inv_freq(const LlamaConfig& c) {
  const int64_t dim = c.dim_head();
  // transformers: 1 / base ** (arange(0, dim, 2, dtype=int64).float() / dim)
  at::Tensor exps = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / static_cast<float>(dim);
  at::Tensor inv = 1.0 / at::pow(static_cast<double>(c.rope_theta), exps);
  inv = inv.to(at::kFloat);
  if (!c.rope_scaling) return inv;
  const auto& s = *c.rope_scaling;
  if (s.rope_type == "linear") return inv / s.factor;
  // llama3: keep high frequencies, divide low ones by factor, interpolate in between.
  const double old_ctx = static_cast<double>(s.original_max_position_embeddings);
  const double low_wavelen = old_ctx / s.low_freq_factor;
  const double high_wavelen = old_ctx / s.high_freq_factor;
  at::Tensor wavelen = 2 * M_PI / inv;
  at::Tensor scaled = at::where(wavelen > low_wavelen, inv / s.factor, inv);
  at::Tensor smooth = (old_ctx / wavelen - s.low_freq_factor) /
                      (s.high_freq_factor - s.low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
  at::Tensor medium = at::logical_not(wavelen < high_wavelen)
                          .logical_and(at::logical_not(wavelen > low_wavelen));
  return at::where(medium, smoothed, scaled);
}

LinearImpl::LinearImpl(int64_t in, int64_t out, bool has_bias, const at::TensorOptions& opts)
    : in_features_(in), out_features_(out) {
  weight = register_parameter("weight", at::empty({out, in}, opts));  // [out, in]
  if (has_bias) bias = register_parameter("bias", at::empty({out}, opts));
}

at::Device LinearImpl::device() const { return nf4 ? nf4->device() : weight.device(); }

void LinearImpl::materialize_bias(const at::TensorOptions& opts) {
  if (!bias.defined() || !bias.is_meta()) return;
  parameters_.erase("bias");
  bias = register_parameter("bias", at::empty({out_features_}, opts));
}

void LinearImpl::set_nf4(std::shared_ptr<quant::Nf4Tensor> w, at::ScalarType compute_dtype,
                         const at::TensorOptions& bias_opts) {
  FTUNE_CHECK(w && w->shape == std::vector<int64_t>({out_features_, in_features_}),
              "Linear::set_nf4: expected a weight of shape [", out_features_, ", ", in_features_, "]");
  if (parameters_.contains("weight")) parameters_.erase("weight");  // gone, not a frozen parameter
  weight = at::Tensor();
  materialize_bias(bias_opts.device(w->device()));
  nf4 = std::move(w);
  nf4_compute_dtype = compute_dtype;
}

void LinearImpl::set_dense_weight(const at::Tensor& w) {
  FTUNE_CHECK(w.sizes() == at::IntArrayRef({out_features_, in_features_}),
              "Linear::set_dense_weight: expected a weight of shape [", out_features_, ", ",
              in_features_, "], got ", w.sizes());
  const bool was_nf4 = nf4 != nullptr;
  nf4.reset();
  if (parameters_.contains("weight")) parameters_.erase("weight");
  weight = register_parameter("weight", w, /*requires_grad=*/!was_nf4);
  materialize_bias(w.options());
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  at::Tensor y = nf4 ? quant::nf4_linear(x, *nf4, bias, nf4_compute_dtype) : at::linear(x, weight, bias);
  if (!lora_A) return y;
  // PEFT: x is cast to the adapter's dtype first, then dropout, then
  // result + lora_B(lora_A(dropout(x))) * scaling.
  at::Tensor h = x.to(lora_A->weight.scalar_type());
  if (lora_dropout > 0) h = at::dropout(h, lora_dropout, is_training());
  // The scale multiplies the rank-r activations [.., r], not the [.., out] product as PEFT
  // writes it: the same value up to rounding, for r/out of the elementwise work (forward and
  // backward).
  at::Tensor delta = at::linear(at::linear(h, lora_A->weight) * lora_scale, lora_B->weight);
  if (delta.scalar_type() == y.scalar_type()) return y + delta;
  return (y.to(delta.scalar_type()) + delta).to(y.scalar_type());  // PEFT adds in the adapter dtype
}

std::vector<std::pair<std::string, at::Tensor>> base_parameters(torch::nn::Module& m) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : m.named_parameters()) {
    if (p.key().find(".lora_") == std::string::npos) out.emplace_back(p.key(), p.value());
  }
  return out;
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim, const at::TensorOptions& opts) {
  weight = register_parameter("weight", at::empty({num, dim}, opts));  // [num, dim]
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps, const at::TensorOptions& opts) : eps_(eps) {
  weight = register_parameter("weight", at::empty({dim}, opts));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  auto dtype = x.scalar_type();
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps_);
  return weight * h.to(dtype);
}

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& c, const at::TensorOptions& opts)
    : n_heads_(c.num_attention_heads), n_kv_heads_(c.num_key_value_heads),
      head_dim_(c.dim_head()) {
  const int64_t h = c.hidden_size;
  const bool b = c.attention_bias;
  q_proj = register_module("q_proj", Linear(h, n_heads_ * head_dim_, b, opts));
  k_proj = register_module("k_proj", Linear(h, n_kv_heads_ * head_dim_, b, opts));
  v_proj = register_module("v_proj", Linear(h, n_kv_heads_ * head_dim_, b, opts));
  o_proj = register_module("o_proj", Linear(n_heads_ * head_dim_, h, b, opts));
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos,
                                       const at::Tensor& sin, const at::Tensor& attn_mask,
                                       at::Tensor* k_cache, at::Tensor* v_cache) {
  const int64_t B = x.size(0), T = x.size(1);
  at::Tensor q = q_proj(x).view({B, T, n_heads_, head_dim_}).transpose(1, 2);     // [B, nh, T, hd]
  at::Tensor k = k_proj(x).view({B, T, n_kv_heads_, head_dim_}).transpose(1, 2);  // [B, nkv, T, hd]
  at::Tensor v = v_proj(x).view({B, T, n_kv_heads_, head_dim_}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  if (k_cache) {
    if (k_cache->defined()) {
      k = at::cat({*k_cache, k}, 2);
      v = at::cat({*v_cache, v}, 2);
    }
    *k_cache = k;
    *v_cache = v;
  }
  // Without a mask: causal for a fresh sequence; a single new token may see the whole cache.
  const bool causal = !attn_mask.defined() && q.size(2) == k.size(2) && T > 1;
  at::Tensor out = at::scaled_dot_product_attention(
      q, k, v, attn_mask.defined() ? std::optional<at::Tensor>(attn_mask) : std::nullopt,
      /*dropout_p=*/0.0, causal, /*scale=*/1.0 / std::sqrt(static_cast<double>(head_dim_)),
      /*enable_gqa=*/n_kv_heads_ != n_heads_);  // [B, nh, T, hd]
  return o_proj(out.transpose(1, 2).reshape({B, T, n_heads_ * head_dim_}));
}

LlamaMLPImpl::LlamaMLPImpl(const LlamaConfig& c, const at::TensorOptions& opts) {
  const int64_t h = c.hidden_size, i = c.intermediate_size;
  gate_proj = register_module("gate_proj", Linear(h, i, c.mlp_bias, opts));
  up_proj = register_module("up_proj", Linear(h, i, c.mlp_bias, opts));
  down_proj = register_module("down_proj", Linear(i, h, c.mlp_bias, opts));
}

at::Tensor LlamaMLPImpl::forward(const at::Tensor& x) {
  return down_proj(at::silu(gate_proj(x)) * up_proj(x));
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& c, const at::TensorOptions& opts,
                                             std::optional<at::TensorOptions> linear_opts) {
  self_attn = register_module("self_attn", LlamaAttention(c, linear_opts.value_or(opts)));
  mlp = register_module("mlp", LlamaMLP(c, linear_opts.value_or(opts)));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, opts));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, opts));
}

at::Tensor LlamaDecoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& cos,
                                          const at::Tensor& sin, const at::Tensor& attn_mask,
                                          at::Tensor* k_cache, at::Tensor* v_cache) {
  at::Tensor h = x + self_attn->forward(input_layernorm(x), cos, sin, attn_mask, k_cache, v_cache);
  return h + mlp(post_attention_layernorm(h));
}

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c, const at::TensorOptions& opts,
                               std::optional<at::TensorOptions> linear_opts) {
  embed_tokens = register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, opts));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layers->push_back(LlamaDecoderLayer(c, opts, linear_opts));
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, opts));
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& c, const at::TensorOptions& opts,
                                           bool nf4_linears)
    : config_(c) {
  c.validate("config");
  if (opts.device().is_cpu() && !nf4_linears) {
    c.check_fits_in_memory(opts.dtype().toScalarType(), "config");
  }
  model = register_module("model", LlamaModel(c, opts, nf4_linears ? std::optional<at::TensorOptions>(
                                                                         opts.device(at::kMeta))
                                                                   : std::nullopt));
  if (!c.tie_word_embeddings) {
    lm_head = register_module("lm_head", Linear(c.hidden_size, c.vocab_size, false, opts));
  }
  inv_freq_ = rope_inv_freq(c);
}

std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes(const LlamaConfig& c) {
  const int64_t h = c.hidden_size, hd = c.dim_head(), i = c.intermediate_size;
  const int64_t q = c.num_attention_heads * hd, kv = c.num_key_value_heads * hd;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.emplace_back("model.embed_tokens.weight", std::vector<int64_t>{c.vocab_size, h});
  auto linear = [&](const std::string& name, int64_t in, int64_t o, bool bias) {
    out.emplace_back(name + ".weight", std::vector<int64_t>{o, in});
    if (bias) out.emplace_back(name + ".bias", std::vector<int64_t>{o});
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    linear(p + "self_attn.q_proj", h, q, c.attention_bias);
    linear(p + "self_attn.k_proj", h, kv, c.attention_bias);
    linear(p + "self_attn.v_proj", h, kv, c.attention_bias);
    linear(p + "self_attn.o_proj", q, h, c.attention_bias);
    linear(p + "mlp.gate_proj", h, i, c.mlp_bias);
    linear(p + "mlp.up_proj", h, i, c.mlp_bias);
    linear(p + "mlp.down_proj", i, h, c.mlp_bias);
    out.emplace_back(p + "input_layernorm.weight", std::vector<int64_t>{h});
    out.emplace_back(p + "post_attention_layernorm.weight", std::vector<int64_t>{h});
  }
  out.emplace_back("model.norm.weight", std::vector<int64_t>{h});
  if (!c.tie_word_embeddings) linear("lm_head", h, c.vocab_size, false);
  return out;
}

int64_t unit_count(const LlamaConfig& c) { return c.num_hidden_layers + 2; }

int64_t unit_of(const std::string& name, const LlamaConfig& c) {
  auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
  if (starts("model.embed_tokens.")) return 0;
  if (starts("model.norm.") || starts("lm_head.")) return c.num_hidden_layers + 1;
  const std::string layers = "model.layers.";
  if (starts(layers.c_str())) {
    const size_t dot = name.find('.', layers.size());
    const std::string idx = name.substr(layers.size(), dot - layers.size());
    if (!idx.empty() && dot != std::string::npos &&
        idx.find_first_not_of("0123456789") == std::string::npos && idx.size() < 10) {
      const int64_t l = std::stoll(idx);
      if (l < c.num_hidden_layers) return l + 1;
    }
  }
  fail("unit_of: '", name, "' is not a parameter of a ", c.num_hidden_layers,
             "-layer Llama model");
}

at::Tensor LlamaForCausalLMImpl::lm_head_weight() const {
  return lm_head ? lm_head->weight : model->embed_tokens->weight;
}

std::pair<at::Tensor, at::Tensor> LlamaForCausalLMImpl::rope(const at::Tensor& positions,
                                                             at::ScalarType dtype) const {
  at::Tensor inv = inv_freq_.to(positions.device());
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv;  // [B, T, hd/2]
  at::Tensor emb = at::cat({freqs, freqs}, -1);                       // [B, T, hd]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor LlamaForCausalLMImpl::hidden_states(const at::Tensor& input_ids,
                                               const ForwardOptions& opts) {
  FTUNE_CHECK(input_ids.dim() == 2, "forward: input_ids: expected [batch, seq], got ",
              input_ids.dim(), " dims");
  return run_units(input_ids, opts, 0, unit_count(config_));
}

at::Tensor LlamaForCausalLMImpl::run_units(const at::Tensor& input, const ForwardOptions& opts,
                                           int64_t first, int64_t end) {
  const int64_t n_layers = static_cast<int64_t>(model->layers->size());
  FTUNE_CHECK(0 <= first && first < end && end <= n_layers + 2, "forward: units [", first, ", ",
              end, ") outside the model's ", n_layers + 2);
  FTUNE_CHECK(input.dim() == (first == 0 ? 2 : 3), "forward: units from ", first,
              ": expected ", first == 0 ? "input_ids [batch, seq]" : "hidden [batch, seq, hidden]",
              ", got ", input.dim(), " dims");
  const int64_t B = input.size(0), T = input.size(1);
  const int64_t past = opts.cache ? opts.cache->length() : 0;
  FTUNE_CHECK(past + T <= config_.max_position_embeddings, "sequence: length ", past + T,
              " exceeds max_position_embeddings ", config_.max_position_embeddings);
  auto dev = input.device();
  at::Tensor positions = opts.positions.defined()
      ? opts.positions
      : at::arange(past, past + T, at::TensorOptions().dtype(at::kLong).device(dev))
            .unsqueeze(0).expand({B, T});
  at::Tensor x = input;
  if (first == 0) {
    if (unit_hooks_) unit_hooks_->before_unit(0);
    x = model->embed_tokens(input);  // [B, T, H]
    if (unit_hooks_) x = unit_hooks_->after_unit(0, x);
  }
  auto [cos, sin] = rope(positions.to(x.device()), x.scalar_type());
  const int64_t half = sin.size(-1) / 2;
  sin = at::cat({-sin.slice(-1, 0, half), sin.slice(-1, half)}, -1);  // sign of rotate_half
  at::Tensor mask = opts.attn_mask;
  if (!mask.defined() && past > 0 && T > 1) {
    // New tokens attend to the whole cache and causally among themselves.
    at::Tensor qi = at::arange(T, at::TensorOptions().dtype(at::kLong).device(dev)).unsqueeze(1) + past;
    at::Tensor kj = at::arange(past + T, at::TensorOptions().dtype(at::kLong).device(dev)).unsqueeze(0);
    mask = (kj <= qi).view({1, 1, T, past + T});
  }
  if (opts.cache && opts.cache->k.empty()) {
    opts.cache->k.resize(config_.num_hidden_layers);
    opts.cache->v.resize(config_.num_hidden_layers);
  }
  const bool checkpoint = grad_checkpointing_ && torch::GradMode::is_enabled() && !opts.cache;
  // A checkpointed layer's output needs grad only if its input does: with a frozen embedding
  // (LoRA) the input must be marked, or the adapters of every layer would get no gradient
  // (what transformers' enable_input_require_grads works around).
  if (checkpoint && !x.requires_grad()) x = x.detach().requires_grad_(true);
  for (int64_t unit = std::max<int64_t>(first, 1); unit < std::min(end, n_layers + 1); ++unit) {
    const size_t i = static_cast<size_t>(unit - 1);
    auto layer = model->layers->ptr<LlamaDecoderLayerImpl>(i);
    if (unit_hooks_) unit_hooks_->before_unit(unit);
    if (cos.device() != x.device()) {  // model parallelism: this layer sits on another device
      cos = cos.to(x.device());
      sin = sin.to(x.device());
      if (mask.defined()) mask = mask.to(x.device());
    }
    if (checkpoint) {
      x = CheckpointedLayer::apply(x, LayerCall{layer, cos, sin, mask});
    } else if (opts.cache) {
      x = layer->forward(x, cos, sin, mask, &opts.cache->k[i], &opts.cache->v[i]);
    } else {
      x = layer->forward(x, cos, sin, mask);
    }
    if (unit_hooks_) x = unit_hooks_->after_unit(unit, x);
  }
  if (end < n_layers + 2) return x;
  if (unit_hooks_) unit_hooks_->before_unit(n_layers + 1);
  return model->norm(x);
}

at::Tensor LlamaForCausalLMImpl::forward(const at::Tensor& input_ids, const ForwardOptions& opts) {
  const at::Tensor h = hidden_states(input_ids, opts);
  return at::linear(h, lm_head_weight().to(h.device()));
}

void init_weights(LlamaForCausalLM& m, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double std = m->config().initializer_range;
  for (auto& item : m->named_parameters()) {
    const std::string& name = item.key();
    at::Tensor& p = item.value();
    at::Tensor cpu = at::empty(p.sizes(), at::kFloat);
    if (name.find("norm.weight") != std::string::npos) {
      cpu.fill_(1.0);
    } else if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0) {
      cpu.zero_();
    } else {
      cpu.normal_(0.0, std, gen);
    }
    if (name == "model.embed_tokens.weight" && m->config().pad_token_id &&
        *m->config().pad_token_id < cpu.size(0)) {
      cpu[*m->config().pad_token_id].zero_();  // transformers zeroes the padding_idx row
    }
    p.copy_(cpu);
  }
}

}  // namespace ftune::model
