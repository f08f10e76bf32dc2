// The VRAM estimator's arithmetic; see estimate.h and docs/memory.md for every formula.
#include "memory/estimate.h"

#include <algorithm>
#include <cmath>

#include "config/train_config.h"
#include "core/error.h"
#include "lora/lora.h"
#include "parallel/pipeline_schedule.h"

namespace ftune::memory {
namespace {

struct StrategyName {
  Strategy s;
  const char* name;
};
constexpr StrategyName kStrategies[] = {
    {Strategy::kSingle, "single"}, {Strategy::kDdp, "ddp"},   {Strategy::kZero1, "zero1"},
    {Strategy::kZero2, "zero2"},   {Strategy::kFsdp, "fsdp"}, {Strategy::kPipeline, "pipeline"},
    {Strategy::kModelParallel, "model_parallel"},
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool staged(Strategy s) { return s == Strategy::kPipeline || s == Strategy::kModelParallel; }

// One decoder linear: its module name, input and output features.
struct LinearShape {
  const char* name;
  int64_t in, out;
};
std::vector<LinearShape> layer_linears(const model::LlamaConfig& c) {
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  const int64_t hq = c.num_attention_heads * c.dim_head(), hkv = c.num_key_value_heads * c.dim_head();
  return {{"q_proj", h, hq},   {"k_proj", h, hkv}, {"v_proj", h, hkv}, {"o_proj", hq, h},
          {"gate_proj", h, f}, {"up_proj", h, f},  {"down_proj", f, h}};
}

std::vector<std::string> targets_of(const EstimateOptions& o) {
  if (!o.lora()) return {};
  return lora::resolve_targets(o.lora_targets, "memory: --lora-targets");
}

bool has(const std::vector<std::string>& names, const std::string& n) {
  return std::find(names.begin(), names.end(), n) != names.end();
}

// Bytes of one layer's dense parts that stay unquantized under QLoRA: norms and biases.
int64_t layer_dense_extras(const model::LlamaConfig& c) {
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  const int64_t hq = c.num_attention_heads * c.dim_head(), hkv = c.num_key_value_heads * c.dim_head();
  int64_t n = 2 * h;
  if (c.attention_bias) n += hq + 2 * hkv + h;
  if (c.mlp_bias) n += 2 * f + h;
  return n;
}

}  // namespace

Strategy parse_strategy(const std::string& name, const std::string& where) {
  for (const auto& s : kStrategies) {
    if (name == s.name) return s.s;
  }
  std::string names;
  for (const auto& s : kStrategies) names += std::string(names.empty() ? "" : ", ") + s.name;
  fail(where, ": expected one of ", names, ", got \"", name, "\"");
}

const char* strategy_name(Strategy s) {
  for (const auto& n : kStrategies) {
    if (n.s == s) return n.name;
  }
  return "?";
}

const std::vector<std::string>& strategy_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const auto& s : kStrategies) v.emplace_back(s.name);
    return v;
  }();
  return names;
}

int zero_stage(Strategy s) {
  switch (s) {
    case Strategy::kZero1: return 1;
    case Strategy::kZero2: return 2;
    case Strategy::kFsdp: return 3;
    default: return 0;
  }
}

void EstimateOptions::validate(const model::LlamaConfig& c) const {
  const std::string s = strategy_name(strategy);
  FTUNE_CHECK(world_size >= 1, "memory: --world-size: expected an integer >= 1, got ", world_size);
  FTUNE_CHECK(pp >= 1, "memory: --pp: expected an integer >= 1, got ", pp);
  FTUNE_CHECK(micro_batch >= 1, "memory: --micro-batch: expected an integer >= 1, got ",
              micro_batch);
  FTUNE_CHECK(grad_accum >= 1, "memory: --grad-accum: expected an integer >= 1, got ", grad_accum);
  FTUNE_CHECK(seq_len >= 1, "memory: --seq-len: expected an integer >= 1, got ", seq_len);
  FTUNE_CHECK(target_fraction > 0 && target_fraction <= 1,
              "memory: --target-fraction: expected a number in (0, 1], got ", target_fraction);
  FTUNE_CHECK(strategy != Strategy::kSingle || world_size == 1,
              "memory: --world-size: --strategy single runs one rank, got ", world_size,
              " (ddp, zero1, zero2, fsdp and pipeline use several)");
  if (staged(strategy)) {
    FTUNE_CHECK(world_size % pp == 0, "memory: --world-size: ", world_size,
                " is not divisible by --pp ", pp);
    FTUNE_CHECK(pp <= c.num_hidden_layers, "memory: --pp: ", pp, " stages for ",
                c.num_hidden_layers, " decoder layers (every stage needs at least one)");
    FTUNE_CHECK(strategy != Strategy::kModelParallel || world_size == pp,
                "memory: --world-size: model_parallel is one process over --pp ", pp,
                " devices, so --world-size must equal --pp, got ", world_size);
  } else {
    FTUNE_CHECK(pp == 1, "memory: --pp: only pipeline and model_parallel split the layers into "
                "stages, got --pp ", pp, " with --strategy ", s);
  }
  FTUNE_CHECK(lora_dropout >= 0 && lora_dropout < 1,
              "memory: --lora-dropout: expected a number in [0, 1), got ", lora_dropout);
  FTUNE_CHECK(lora_r >= 0, "memory: --lora-r: expected an integer >= 0 (0 = full fine-tuning), got ",
              lora_r);
  FTUNE_CHECK(!qlora || lora(), "memory: --qlora: needs LoRA adapters (--lora-r R > 0): a 4-bit "
              "base can only be frozen");
  FTUNE_CHECK(!offload_optimizer || zero_stage(strategy) > 0,
              "memory: --offload: optimizer offload needs --strategy zero1, zero2 or fsdp (the "
              "sharded optimizer step is what moves to the CPU, as in ftune train), got ", s);
  FTUNE_CHECK(nf4_blocksize >= 64 && nf4_blocksize <= 4096 &&
                  (nf4_blocksize & (nf4_blocksize - 1)) == 0,
              "memory: NF4 blocksize: expected a power of two from 64 to 4096, got ", nf4_blocksize);
  if (lora()) {
    for (const auto& t : layer_linears(c)) {
      if (!has(targets_of(*this), t.name)) continue;
      FTUNE_CHECK(lora_r <= std::min(t.in, t.out), "memory: --lora-r: ", lora_r,
                  " exceeds the dims of ", t.name, " [", t.out, ", ", t.in, "]");
    }
  }
}

ParamCounts count_parameters(const model::LlamaConfig& c, const EstimateOptions& o) {
  ParamCounts p;
  const int64_t h = c.hidden_size, L = c.num_hidden_layers;
  p.embedding = c.vocab_size * h;
  p.lm_head = c.tie_word_embeddings ? 0 : c.vocab_size * h;
  p.final_norm = h;
  const std::vector<std::string> targets = targets_of(o);
  for (const auto& t : layer_linears(c)) {
    p.layer_linears += t.in * t.out;
    p.largest_linear = std::max(p.largest_linear, t.in * t.out);
    if (has(targets, t.name)) p.lora_per_layer += o.lora_r * (t.in + t.out);
  }
  p.per_layer = p.layer_linears + layer_dense_extras(c);
  p.total = p.embedding + p.lm_head + p.final_norm + L * p.per_layer;
  p.trainable = o.lora() ? L * p.lora_per_layer : p.total;
  return p;
}

int64_t nf4_bytes(int64_t numel, int64_t blocksize, bool double_quant) {
  const int64_t blocks = ceil_div(numel, blocksize);
  int64_t b = ceil_div(numel, 2) + 16 * 4;  // packed nibbles + the fp32 code table
  if (!double_quant) return b + 4 * blocks;  // fp32 absmax
  // uint8 absmax, fp32 nested absmax per 256 blocks, fp32 nested map [256], fp32 offset.
  return b + blocks + 4 * ceil_div(blocks, 256) + 256 * 4 + 4;
}

ModelStates zero_model_states(int64_t psi, int64_t dp, int stage, bool mixed, Optimizer opt) {
  const int64_t shard = ceil_div(psi, dp);
  const int64_t w = mixed ? 2 : 4, g = mixed ? 2 : 4, m = mixed ? 4 : 0;
  const int64_t k = opt == Optimizer::kAdamW ? 8 : 4;  // fp32 m + v, or the momentum
  ModelStates s;
  s.weights = w * (stage >= 3 ? shard : psi);
  s.gradients = g * (stage >= 2 ? shard : psi);
  s.master_weights = m * (stage >= 1 ? shard : psi);
  s.optimizer_states = k * (stage >= 1 ? shard : psi);
  return s;
}

// Per token, what autograd keeps for the backward of one decoder layer as ftune (and transformers'
// LlamaDecoderLayer with SDPA) computes it. a = bytes of the residual stream (fp32 when the model
// weights are fp32: full fine-tuning, or fp32 LoRA; bf16 for a bf16 frozen base), c = bytes of the
// compute dtype (bf16 under autocast). A linear saves its input only when its weight trains (full
// fine-tuning); under autocast each such linear saves its own bf16 cast of an fp32 input. A LoRA
// adapter casts its input to fp32 and, under autocast, back to bf16: one saved copy per adapter.
// SDPA saves q and k after RoPE, v, its output and the fp32 logsumexp per head; RoPE's products
// with the (constant) tables save nothing else; the output feeds o_proj without a copy.
int64_t layer_activation_bytes_per_token(const model::LlamaConfig& c, const EstimateOptions& o) {
  const bool full = !o.lora();
  const int64_t h = c.hidden_size, f = c.intermediate_size, nh = c.num_attention_heads;
  const int64_t hq = nh * c.dim_head(), hkv = c.num_key_value_heads * c.dim_head();
  const int64_t a = (full || !o.bf16) ? 4 : 2, cb = o.bf16 ? 2 : 4;
  const std::vector<std::string> targets = targets_of(o);

  // A linear input of n features in dtype `du`, read by `consumers`; `saved` when another op
  // already keeps that very tensor.
  // With LoRA dropout each adapter keeps its dropout's mask (CUDA's fused dropout: one bool per
  // element; CPU: the float noise it multiplied by, in the adapter's fp32) and A keeps its own
  // dropped input (or the autocast cast of it), never the shared tensor.
  const bool dropout = o.lora_dropout > 0;
  const int64_t mask_bytes = o.cuda ? 1 : 4;
  auto input_saves = [&](int64_t n, int64_t du, std::initializer_list<const char*> consumers,
                         bool saved) -> int64_t {
    int64_t copies = 0, masks = 0;
    bool shared = false;
    for (const char* name : consumers) {
      if (full) {  // the base linear keeps its input: the tensor itself, or its autocast cast
        if (du == cb) shared = true; else ++copies;
      }
      if (has(targets, name)) {  // x.to(fp32): the tensor itself in fp32, else cast back to bf16
        if (dropout) ++copies, ++masks;
        else if (cb == 4) shared = true;
        else ++copies;
      }
    }
    return copies * cb * n + masks * mask_bytes * n + (shared && !saved ? du * n : 0);
  };

  int64_t b = 0;
  // input_layernorm and post_attention_layernorm: the fp32 input (or an fp32 copy of a bf16 one)
  // that pow and the scaling keep, rsqrt per token, and the normalized input the weight's
  // gradient needs when the weight trains.
  b += 2 * (4 * h + 4 + (full ? a * h : 0));
  b += input_saves(h, a, {"q_proj", "k_proj", "v_proj"}, false);
  b += input_saves(h, a, {"gate_proj", "up_proj"}, false);
  // Attention: q, k (after RoPE), v and the output in the compute dtype, logsumexp in fp32.
  b += cb * (2 * hq + 2 * hkv) + 4 * nh;
  b += input_saves(hq, cb, {"o_proj"}, true);
  // SwiGLU: gate_proj's output (silu's input), silu's output and up_proj's output (the product's
  // inputs), then the product, down_proj's input.
  b += 3 * cb * f;
  b += input_saves(f, cb, {"down_proj"}, false);
  // Each adapter keeps A's [.., r] output for B.
  for (const auto& t : layer_linears(c)) {
    if (has(targets, t.name)) b += cb * o.lora_r;
  }
  return b;
}

int64_t Breakdown::persistent() const {
  return states.total() + frozen_base + ftune_extra + overhead;
}

int64_t Breakdown::total() const {
  const int64_t forward_end =
      persistent() - (accumulating ? 0 : grad_timed) + forward_backward() + head_grad;
  const int64_t backward_end =
      persistent() + backward_end_extra + gathered_at_backward_end + comm_buffers;
  return std::max({forward_end, backward_end, persistent() + sync_buffers,
                   persistent() - step_released + step_buffers});
}

Estimate estimate(const model::LlamaConfig& c, const EstimateOptions& o) {
  o.validate(c);
  Estimate e;
  e.params = count_parameters(c, o);
  const ParamCounts& p = e.params;
  const bool full = !o.lora(), mixed = full && o.bf16;
  const int64_t a = (full || !o.bf16) ? 4 : 2, cb = o.bf16 ? 2 : 4;
  const int64_t h = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;
  const int64_t T = o.micro_batch * o.seq_len;  // tokens per micro-batch
  const int64_t P = staged(o.strategy) ? o.pp : 1;
  const int stage_kind = zero_stage(o.strategy);
  e.dp = o.strategy == Strategy::kSingle ? 1 : o.dp();

  // Stages: ftune's balanced split by what each layer holds (all layers alike here), the
  // embedding with the first stage, the final norm and head with the last.
  e.stage_split = {0, L};
  if (P > 1) {
    const int64_t cost = p.per_layer + p.lora_per_layer;
    e.stage_split = parallel::balanced_split(std::vector<int64_t>(L, cost), P);
  }

  // Packed rows: each layer's SDPA saves the mask converted to the compute dtype (quadratic in S,
  // so not a per-token term); the bool mask itself is held once for all layers.
  const int64_t mask_bool = o.packed_mask ? o.micro_batch * o.seq_len * o.seq_len : 0;
  e.act_per_layer = layer_activation_bytes_per_token(c, o) * T + cb * mask_bool;
  e.act_per_layer_ckpt = a * h * T;  // a checkpointed layer keeps only its input
  // The loss's working set (src/model/loss.cpp), every position counted as a target: the gathered
  // target rows (and their cast), the head cast to the compute dtype, the rows' gradient kept for
  // backward, one chunk's logits in the compute dtype + fp32 (+ its bf16 softmax gradient), and
  // under autocast the bf16 product for the head's gradient.
  const int64_t head_bytes = full ? 4 : a;
  const int64_t head_casts = (head_bytes != cb ? cb * V * h : 0) + (full && cb != 4 ? cb * V * h : 0);
  // It gathers the target positions only: Tt of the T.
  const int64_t Tt = std::max<int64_t>(1, std::llround(static_cast<double>(T) * o.target_fraction));
  const int64_t chunk = std::min(Tt, std::max<int64_t>(1, kLossChunkLogits / V)) * V;
  e.logits_chunked = a * Tt * h + (a != cb ? cb * Tt * h : 0) + cb * Tt * h +
                     (cb == 4 ? 4 : 4 + cb) * chunk + head_casts;
  // The plain path: [T, V] logits in the compute dtype, their fp32 upcast kept by log_softmax and
  // its fp32 gradient, and the same head casts.
  e.logits_full = T * V * (8 + (cb == 2 ? 2 : 0)) + head_casts;
  const int64_t final_norm_act = (4 * h + 4 + (full ? a * h : 0)) * T;

  // The frozen base's bytes (LoRA): dense parts in the base dtype, decoder linears in the base
  // dtype or NF4.
  auto layer_base_bytes = [&]() -> int64_t {
    if (!o.qlora) return a * p.per_layer;
    int64_t b = a * layer_dense_extras(c);
    for (const auto& t : layer_linears(c)) b += nf4_bytes(t.in * t.out, o.nf4_blocksize, o.nf4_double_quant);
    return b;
  };
  // FSDP gathers one unit (the embedding, a decoder layer, or the final norm and head) at a time,
  // in bf16 for mixed precision; its largest unit, and that unit's trainable elements.
  const int64_t gather_bytes = mixed ? 2 : 4;
  const int64_t head_unit = p.final_norm + p.lm_head;
  int64_t largest_unit = 0, largest_unit_trainable = 0, layer_unit = 0;
  if (full) {
    layer_unit = gather_bytes * p.per_layer;
    largest_unit = gather_bytes * std::max({p.embedding, p.per_layer, head_unit});
    largest_unit_trainable = std::max({p.embedding, p.per_layer, head_unit});
  } else {
    layer_unit = layer_base_bytes() + 4 * p.lora_per_layer;
    largest_unit = std::max({a * p.embedding, layer_unit, a * head_unit});
    largest_unit_trainable = p.lora_per_layer;
  }

  for (int64_t k = 0; k < P; ++k) {
    const bool first = k == 0, last = k == P - 1;
    const int64_t layers = e.stage_split[k + 1] - e.stage_split[k];
    const int64_t dense_ends = (first ? p.embedding : 0) + (last ? head_unit : 0);
    Breakdown b;
    std::vector<std::pair<std::string, int64_t>> extra;
    int64_t grad_extra = 0;  // the gradient-sized items, held only from the backward on
    auto gradient_item = [&](const char* what, int64_t bytes) {
      extra.emplace_back(what, bytes);
      grad_extra += bytes;
    };
    int64_t host = 0;

    const int64_t psi = full ? layers * p.per_layer + dense_ends : layers * p.lora_per_layer;
    b.states = zero_model_states(psi, e.dp, stage_kind, mixed, o.optimizer);
    if (!full) {
      b.frozen_base = layers * layer_base_bytes() + a * dense_ends;
      if (stage_kind == 3) b.frozen_base = ceil_div(b.frozen_base, e.dp);
    }
    if (P > 1 && last && c.tie_word_embeddings) {
      extra.emplace_back("tied embedding copied to the last stage for the head",
                         (full ? 4 : a) * p.embedding);
    }
    // Where ftune holds more than the paper's layout.
    const int64_t shard = ceil_div(psi, e.dp);
    if (stage_kind == 0 && mixed) {
      gradient_item("fp32 gradients (ftune accumulates .grad in fp32; the paper's are bf16)",
                    2 * psi);
    }
    if (stage_kind == 1 || stage_kind == 2) {
      if (mixed) {
        extra.emplace_back("fp32 parameters of the replica beside the bf16 working copy", 4 * psi);
      } else if (o.offload_optimizer) {
        host += 4 * shard;
      } else {
        extra.emplace_back("the sharded optimizer's fp32 copy of its pieces", 4 * shard);
      }
      if (stage_kind == 1 && mixed) {
        gradient_item("fp32 gradients (ftune accumulates .grad in fp32; the paper's are bf16)",
                      2 * psi);
      }
      if (stage_kind == 2) {
        gradient_item("full fp32 gradients until the reduce-scatter after the backward",
                      4 * psi - b.states.gradients);
      }
    }
    // Gradients exist from the backward through the step (zero_grad frees them; under ZeRO-3
    // the shards' sums, made unit by unit in the backward).
    b.grad_timed = b.states.gradients + grad_extra;
    if (stage_kind < 3) {
      if (full && last) b.head_grad = 4 * (c.tie_word_embeddings ? p.embedding : p.lm_head);
      // The embedding's backward makes a fresh [V, h] gradient and adds it to the head's.
      if (full && first && c.tie_word_embeddings) b.backward_end_extra = 4 * p.embedding;
    }
    if (o.offload_optimizer) {
      host += b.states.master_weights + b.states.optimizer_states + 4 * shard;  // + pinned grads
      b.states.master_weights = 0;
      b.states.optimizer_states = 0;
    }
    for (const auto& [what, bytes] : extra) b.ftune_extra += bytes;

    // Activations: 1F1B keeps P - k micro-batches in flight on stage k; the other strategies one.
    const int64_t in_flight = o.strategy == Strategy::kPipeline ? P - k : 1;
    b.activations = o.grad_ckpt ? layers * e.act_per_layer_ckpt * in_flight + e.act_per_layer
                                : layers * e.act_per_layer * in_flight;
    b.activations += mask_bool * in_flight;
    // The backward of a layer's MLP holds down_proj's input gradient and makes those of silu's
    // output and of up_proj's output ([T, f] each, compute dtype) while the layer's saved
    // activations are still held; when down_proj keeps its input (it trains or is adapted), that
    // saved [T, f] is freed first, so one fewer counts.
    const bool down_saves_input = full || has(targets_of(o), "down_proj");
    if (layers > 0) b.backward_temps = (down_saves_input ? 2 : 3) * cb * T * c.intermediate_size;
    if (last) {
      b.activations += final_norm_act;
      b.logits = o.chunked_loss ? e.logits_chunked : e.logits_full;
    }
    // FSDP: the unit gathered next (the largest) as its receive buffer, its full tensors (or,
    // before them, Gloo's own flat copy) and its send shard, beside the unit computing now (a
    // decoder layer). Measured on the SmolLM2-135M shape, 2.3-2.5 embedding-sized units at the
    // forward's end; a bound of three units over-predicted it by 25%.
    // At the backward's end only the last unit (the embedding) is gathered, beside its full
    // gradients (measured: 1.01x of that on the SmolLM2-135M shape with checkpointing).
    if (stage_kind == 3) {
      b.gathered_params = 2 * largest_unit + ceil_div(largest_unit, e.dp) + layer_unit;
      b.gathered_at_backward_end = largest_unit;
    }
    if (o.qlora) {
      // Nf4Linear dequantizes a weight to its own dtype, then to bf16 (the compute dtype).
      const int64_t wb = o.bf16 ? 2 : 4;
      const int64_t dequantized = p.largest_linear * (wb + (wb != 2 ? 2 : 0));
      b.gathered_params += dequantized;
      b.gathered_at_backward_end += dequantized;
    }
    if (o.strategy == Strategy::kDdp || (o.strategy == Strategy::kPipeline && e.dp > 1)) {
      b.comm_buffers += 4 * psi;  // ftune's DDP keeps every bucket: the fp32 gradient bytes
    }
    // A unit's full fp32 gradients, packed for their reduce-scatter: in the backward only.
    if (stage_kind == 3) b.backward_end_extra += 4 * largest_unit_trainable;
    if (P > 1) b.comm_buffers += 2 * a * h * T;  // the hidden state sent on and the one received
    if (stage_kind == 1 || stage_kind == 2) {
      // The sync copies every gradient into a flat fp32 buffer (padded) while they are all held.
      // zero1's reduced gradients stay views of it through the step (they are the gradient
      // term); zero2 frees it and the full gradients, keeping only its shard's fp32 sum. The
      // gather of the updated shards then holds one shard to send and the flat result; Gloo (the
      // CPU) all-gathers into a flat output of its own and copies it into ours, a second
      // full-size buffer (NCCL writes into ours).
      const int64_t flat = 4 * shard * e.dp;
      b.sync_buffers = flat;
      if (stage_kind == 2) b.step_released = b.grad_timed - 4 * shard;
      b.step_buffers = 4 * shard + flat + (o.cuda ? 0 : flat);
    }
    b.overhead = o.overhead_bytes;
    b.accumulating = o.grad_accum > 1 && o.strategy != Strategy::kPipeline;

    e.stage_totals.push_back(b.total());
    if (k == 0 || b.total() > e.rank.total()) {
      e.rank = b;
      e.stage = k;
      e.trainable_on_rank = psi;
      e.host_bytes = host;
      e.extra_items = extra;
      e.layers_on_rank = layers;
      e.in_flight = in_flight;
    }
  }
  if (P == 1) e.stage_split.clear(), e.stage_totals.clear();
  return e;
}

EstimateOptions options_from_train_config(const config::TrainConfig& t, int64_t world_size) {
  EstimateOptions o;
  const std::string& s = t.parallel.strategy;
  o.world_size = world_size;
  if (s == "none" || (s == "auto" && world_size == 1)) {
    o.strategy = Strategy::kSingle;
  } else if (s == "auto") {
    o.strategy = Strategy::kDdp;
  } else if (s == "zero3") {
    o.strategy = Strategy::kFsdp;
  } else {
    o.strategy = parse_strategy(s, "parallel.strategy");
  }
  if (o.strategy == Strategy::kModelParallel) {
    o.pp = static_cast<int64_t>(t.parallel.devices.size());
    o.world_size = o.pp;
  } else if (o.strategy == Strategy::kPipeline) {
    o.pp = t.parallel.pp;
  }
  o.bf16 = t.model.dtype == "bf16";
  o.grad_ckpt = t.model.grad_checkpointing;
  o.micro_batch = t.training.micro_batch;
  o.grad_accum = t.training.grad_accum;
  o.seq_len = t.data.seq_len;
  o.packed_mask = t.data.packing;
  o.offload_optimizer = t.parallel.offload == "optimizer";
  if (t.lora) {
    o.lora_r = t.lora->r;
    o.lora_targets = t.lora->targets;
    o.lora_dropout = t.lora->dropout;
  }
  o.cuda = t.model.device.rfind("cuda", 0) == 0;
  if (t.quant) {
    o.qlora = true;
    o.nf4_blocksize = t.quant->blocksize;
    o.nf4_double_quant = t.quant->double_quant;
  }
  return o;
}

}  // namespace ftune::memory
