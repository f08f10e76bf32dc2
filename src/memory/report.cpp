// Rendering of estimates and --fit results; see report.h.
#include "memory/report.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "core/error.h"

namespace ftune::memory {
namespace {

using nlohmann::json;

std::string gb(int64_t bytes) { return format_gb(bytes); }

// "16 Psi", "4 Psi + 12 Psi/N", "16 Psi/N" from the replicated and the divided coefficients.
std::string coef_formula(int64_t whole, int64_t divided) {
  std::string s;
  if (whole) s = std::to_string(whole) + " Psi";
  if (divided) s += (s.empty() ? "" : " + ") + std::to_string(divided) + " Psi/N";
  return s.empty() ? "0" : s;
}

struct Coefs {
  int64_t w, g, m, k;
};
Coefs coefs(const EstimateOptions& o) {
  const bool mixed = !o.lora() && o.bf16;
  return {mixed ? 2 : 4, mixed ? 2 : 4, mixed ? 4 : 0, o.optimizer == Optimizer::kAdamW ? 8 : 4};
}

std::string method_text(const EstimateOptions& o) {
  if (!o.lora()) return "full fine-tuning";
  std::string targets;
  for (const auto& t : o.lora_targets) targets += (targets.empty() ? "" : ",") + t;
  std::string text = std::string(o.qlora ? "QLoRA (NF4 base)" : "LoRA") + " r=" +
                     std::to_string(o.lora_r) + " on " + targets;
  if (o.lora_dropout > 0) {
    std::ostringstream d;
    d << ", dropout " << o.lora_dropout << " (" << (o.cuda ? "CUDA: bool" : "CPU: fp32") << " masks)";
    text += d.str();
  }
  return text;
}

std::string setup_text(const EstimateOptions& o, const Estimate& e) {
  std::ostringstream s;
  s << strategy_name(o.strategy);
  if (o.strategy != Strategy::kSingle) s << " over " << o.world_size << " ranks";
  if (o.pp > 1) s << " (" << o.pp << " stages x " << e.dp << " data-parallel)";
  else if (o.strategy != Strategy::kSingle) s << " (N = " << e.dp << ")";
  s << ", " << (o.bf16 ? (o.lora() ? "bf16 base, bf16 autocast" : "bf16 autocast over fp32 master weights")
                       : "fp32")
    << ", " << (o.optimizer == Optimizer::kAdamW ? "AdamW" : "SGD with momentum") << ", "
    << method_text(o) << "\nmicro-batch " << o.micro_batch << " x " << o.seq_len << " tokens"
    << (o.grad_accum > 1 ? " x " + std::to_string(o.grad_accum) + " accumulated" : "") << ", "
    << (o.grad_ckpt ? "activation checkpointing" : "no activation checkpointing") << ", "
    << (o.chunked_loss ? "chunked loss" : "full logits")
    << (o.packed_mask ? ", packed rows (a [B, 1, S, S] mask per layer)" : "")
    << (o.offload_optimizer ? ", optimizer offloaded to the CPU" : "");
  return s.str();
}

std::string model_text(const ModelRef& m, const Estimate& e) {
  std::ostringstream s;
  s << m.name << " (" << e.params.total << " parameters, " << e.params.trainable << " trainable)";
  return s.str();
}

json options_json(const EstimateOptions& o, const Estimate& e) {
  return {{"strategy", strategy_name(o.strategy)},
          {"world_size", o.world_size},
          {"pp", o.pp},
          {"dp", e.dp},
          {"dtype", o.bf16 ? "bf16" : "fp32"},
          {"optimizer", o.optimizer == Optimizer::kAdamW ? "adamw" : "sgd"},
          {"method", method_name(method_of(o))},
          {"lora_r", o.lora_r},
          {"lora_targets", o.lora() ? json(o.lora_targets) : json::array()},
          {"lora_dropout", o.lora() ? o.lora_dropout : 0.0},
          {"device", o.cuda ? "cuda" : "cpu"},
          {"qlora", o.qlora},
          {"micro_batch", o.micro_batch},
          {"grad_accum", o.grad_accum},
          {"seq_len", o.seq_len},
          {"grad_ckpt", o.grad_ckpt},
          {"offload", o.offload_optimizer ? "optimizer" : "none"},
          {"chunked_loss", o.chunked_loss},
          {"packed_mask", o.packed_mask},
          {"target_fraction", o.target_fraction}};
}

}  // namespace

json breakdown_json(const Breakdown& b) {
  return {{"weights", b.states.weights},
          {"gradients", b.states.gradients},
          {"master_weights", b.states.master_weights},
          {"optimizer_states", b.states.optimizer_states},
          {"model_states", b.states.total()},
          {"frozen_base", b.frozen_base},
          {"ftune_extra", b.ftune_extra},
          {"activations", b.activations},
          {"logits", b.logits},
          {"gathered_params", b.gathered_params},
          {"gathered_at_backward_end", b.gathered_at_backward_end},
          {"comm_buffers", b.comm_buffers},
          {"backward_temps", b.backward_temps},
          {"sync_buffers", b.sync_buffers},
          {"step_buffers", b.step_buffers},
          {"step_released", b.step_released},
          {"overhead", b.overhead},
          {"grad_timed", b.grad_timed},
          {"head_grad", b.head_grad},
          {"backward_end_extra", b.backward_end_extra},
          {"total", b.total()}};
}

int64_t parse_size(const std::string& text, const std::string& where) {
  auto bad = [&]() -> int64_t {
    fail(where, ": expected a size such as 80GB, 24GiB or 81920MiB, got \"", text, "\"");
  };
  if (text.empty() || !(std::isdigit(static_cast<unsigned char>(text[0])) || text[0] == '.')) bad();
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  std::string unit(end);
  while (!unit.empty() && unit.front() == ' ') unit.erase(0, 1);
  for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  struct Unit {
    const char* name;
    double scale;
  };
  static const Unit kUnits[] = {{"", 1},       {"B", 1},         {"KB", 1e3},  {"MB", 1e6},
                                {"GB", 1e9},   {"TB", 1e12},     {"KIB", 1024.0},
                                {"MIB", 1048576.0}, {"GIB", 1073741824.0}, {"TIB", 1099511627776.0},
                                {"G", 1e9},    {"M", 1e6},       {"T", 1e12}};
  for (const Unit& u : kUnits) {
    if (unit != u.name) continue;
    const double bytes = v * u.scale;
    if (!std::isfinite(bytes) || bytes < 1 || bytes > 9.0e18) bad();
    return static_cast<int64_t>(bytes);
  }
  return bad();
}

std::string format_gb(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f", static_cast<double>(bytes) / 1e9);
  return buf;
}

json estimate_json(const model::LlamaConfig& c, const ModelRef& m, const EstimateOptions& o,
                   const Estimate& e, int64_t gpu_mem) {
  json items = json::array();
  for (const auto& [what, bytes] : e.extra_items) items.push_back({{"what", what}, {"bytes", bytes}});
  json j = {
      {"model",
       {{"name", m.name},
        {"preset", m.preset},
        {"parameters", e.params.total},
        {"trainable", e.params.trainable},
        {"embedding", e.params.embedding},
        {"per_layer", e.params.per_layer},
        {"lm_head", e.params.lm_head},
        {"lora_per_layer", e.params.lora_per_layer},
        {"config", c.to_json()}}},
      {"options", options_json(o, e)},
      {"trainable_on_rank", e.trainable_on_rank},
      {"per_rank", breakdown_json(e.rank)},
      {"ftune_extra_items", items},
      {"activations",
       {{"per_layer", e.act_per_layer},
        {"per_layer_checkpointed", e.act_per_layer_ckpt},
        {"layers_on_rank", e.layers_on_rank},
        {"micro_batches_in_flight", e.in_flight}}},
      {"logits", {{"chunked", e.logits_chunked}, {"full", e.logits_full}}},
      {"host_bytes", e.host_bytes},
      {"total", e.rank.total()},
  };
  if (!e.stage_split.empty()) {
    j["stages"] = {{"split", e.stage_split}, {"totals", e.stage_totals}, {"largest", e.stage}};
  }
  if (gpu_mem > 0) {
    j["gpu_mem"] = gpu_mem;
    j["fits"] = e.rank.total() <= gpu_mem;
  }
  return j;
}

std::string estimate_table(const model::LlamaConfig& c, const ModelRef& m,
                           const EstimateOptions& o, const Estimate& e, int64_t gpu_mem) {
  (void)c;
  const Breakdown& b = e.rank;
  const int stage = zero_stage(o.strategy);
  const Coefs k = coefs(o);
  std::ostringstream s;
  char line[256];
  auto row = [&](const char* what, int64_t bytes, const std::string& note) {
    std::snprintf(line, sizeof(line), "  %-28s %10s  %s\n", what, gb(bytes).c_str(), note.c_str());
    s << line;
  };
  s << "ftune memory: " << model_text(m, e) << "\n" << setup_text(o, e) << "\n\n";
  s << "per rank" << (e.stage_split.empty() ? "" : " (stage " + std::to_string(e.stage) + ", the largest)")
    << ", Psi = " << e.trainable_on_rank << " trainable"
    << (o.lora() ? " (adapter)" : "") << " parameters"
    << (stage > 0 || o.strategy == Strategy::kDdp ? ", N = " + std::to_string(e.dp) : "") << "\n";
  std::snprintf(line, sizeof(line), "  %-28s %10s  %s\n", "", "GB", "");
  s << line;
  const bool host = o.offload_optimizer;
  row("weights", b.states.weights, coef_formula(stage >= 3 ? 0 : k.w, stage >= 3 ? k.w : 0) +
                                       (k.w == 2 ? " (bf16)" : " (fp32)"));
  row("gradients", b.states.gradients, coef_formula(stage >= 2 ? 0 : k.g, stage >= 2 ? k.g : 0));
  row("master weights", b.states.master_weights,
      k.m == 0 ? "none: the weights are fp32" : host ? "on the host" : coef_formula(stage >= 1 ? 0 : 4, stage >= 1 ? 4 : 0) + " (fp32)");
  row("optimizer states", b.states.optimizer_states,
      host ? "on the host"
           : coef_formula(stage >= 1 ? 0 : k.k, stage >= 1 ? k.k : 0) +
                 (o.optimizer == Optimizer::kAdamW ? " (AdamW m, v)" : " (momentum)"));
  const int64_t whole = (stage >= 3 ? 0 : k.w) + (stage >= 2 ? 0 : k.g) +
                        (host ? 0 : (stage >= 1 ? 0 : k.m + k.k));
  const int64_t divided = (stage >= 3 ? k.w : 0) + (stage >= 2 ? k.g : 0) +
                          (host ? 0 : (stage >= 1 ? k.m + k.k : 0));
  row("= model states (ZeRO)", b.states.total(), coef_formula(whole, divided));
  if (o.lora()) row("frozen base", b.frozen_base, o.qlora ? "NF4 linears + dense rest" : (o.bf16 ? "bf16" : "fp32"));
  if (!e.extra_items.empty()) {
    row("ftune extra", b.ftune_extra, "beyond the paper's layout:");
    for (const auto& [what, bytes] : e.extra_items) s << "      " << gb(bytes) << "  " << what << "\n";
  }
  std::ostringstream act;
  act << e.layers_on_rank << " layers x ";
  if (o.grad_ckpt) {
    act << gb(e.act_per_layer_ckpt) << " (inputs) + one layer recomputed " << gb(e.act_per_layer);
  } else {
    act << gb(e.act_per_layer) << " (checkpointed: " << gb(e.act_per_layer_ckpt) << " each)";
  }
  if (e.in_flight > 1) act << ", x " << e.in_flight << " micro-batches in flight";
  row("activations", b.activations, act.str());
  row("logits and their gradient", b.logits,
      e.stage_split.empty() || e.stage + 1 == o.pp
          ? (o.chunked_loss ? "chunked loss (full logits: " + gb(e.logits_full) + ")"
                            : "full logits (chunked loss: " + gb(e.logits_chunked) + ")")
          : "on the last stage");
  if (b.gathered_params) {
    row("gathered parameters", b.gathered_params,
        std::string(stage == 3 ? "fsdp: two units + a receive buffer" : "") +
            (o.qlora ? (stage == 3 ? "; " : "") + std::string("one dequantized linear") : ""));
  }
  if (b.comm_buffers) {
    const bool buckets = o.strategy == Strategy::kDdp || (o.strategy == Strategy::kPipeline && e.dp > 1);
    std::string what = buckets ? "DDP buckets (every fp32 gradient)" : "";
    if (stage == 3) what = "one unit's full fp32 gradients";
    if (o.pp > 1) what += (what.empty() ? "" : " + ") + std::string("stage hand-offs");
    row("communication buffers", b.comm_buffers, what);
  }
  if (b.backward_temps) row("backward working set", b.backward_temps, "SwiGLU's [T, f] gradients (2-3)");
  if (b.sync_buffers) row("gradient-sync buffer", b.sync_buffers, "flat fp32 gradient sum (after backward)");
  if (b.step_buffers) {
    row("optimizer-step buffers", b.step_buffers,
        o.cuda ? "a shard to send + the gathered flat parameters"
               : "a shard to send + the gathered flat parameters + Gloo's own copy");
  }
  if (b.step_released) row("  freed before the step", b.step_released, "zero2: the full gradients");
  row("framework overhead", b.overhead, "CUDA context, workspaces, fragmentation");
  if (b.grad_timed) {
    row("  of which gradients", b.grad_timed, "held from the backward through the step only");
  }
  if (b.head_grad) row("head gradient", b.head_grad, "the backward's first gradient");
  if (b.backward_end_extra) {
    row("tied embedding gradient", b.backward_end_extra, "made fresh, then added to the head's");
  }
  row("total", b.total(), "the largest of forward end, backward end, optimizer step");
  if (e.host_bytes) s << "  host (CPU) memory: " << gb(e.host_bytes) << " GB\n";
  if (!e.stage_split.empty()) {
    s << "  stages:";
    for (size_t i = 0; i < e.stage_totals.size(); ++i) {
      s << " " << i << ": layers " << e.stage_split[i] << "-" << e.stage_split[i + 1] - 1 << " "
        << gb(e.stage_totals[i]) << " GB" << (i + 1 < e.stage_totals.size() ? ";" : "");
    }
    s << "\n";
  }
  if (gpu_mem > 0) {
    const int64_t t = b.total();
    s << "\n" << (t <= gpu_mem ? "fits" : "does not fit") << " in " << gb(gpu_mem) << " GB: "
      << (t <= gpu_mem ? gb(gpu_mem - t) + " GB to spare" : gb(t - gpu_mem) + " GB short") << "\n";
  }
  return s.str();
}

json fit_json(const model::LlamaConfig& c, const ModelRef& m, const FitOptions& f,
              const FitResult& r) {
  auto cand = [&](const Candidate& x) {
    json j = estimate_json(c, m, x.opts, x.est, f.gpu_mem);
    j["tokens_per_s"] = x.time.tokens_per_s();
    j["step_s"] = {{"compute", x.time.compute_s}, {"comm", x.time.comm_s}, {"offload", x.time.offload_s}};
    j["train_overrides"] = train_overrides(x.opts, m.preset ? "/path/to/" + m.name : m.name);
    return j;
  };
  json j = {{"gpu_mem", f.gpu_mem}, {"gpus", f.gpus}, {"searched", r.searched},
            {"fitting", static_cast<int64_t>(r.fitting.size())}};
  if (!r.fitting.empty()) {
    j["best"] = cand(r.fitting.front());
    json top = json::array();
    for (size_t i = 0; i < r.fitting.size() && i < 5; ++i) top.push_back(cand(r.fitting[i]));
    j["top"] = top;
  } else {
    j["best"] = nullptr;
    j["closest"] = cand(r.closest);
  }
  return j;
}

std::string fit_text(const model::LlamaConfig& c, const ModelRef& m, const FitOptions& f,
                     const FitResult& r) {
  std::ostringstream s;
  auto brief = [&](const Candidate& x) {
    std::ostringstream b;
    b << method_name(method_of(x.opts)) << ", " << strategy_name(x.opts.strategy) << ", micro-batch "
      << x.opts.micro_batch << (x.opts.grad_ckpt ? ", checkpointing" : "")
      << (x.opts.offload_optimizer ? ", optimizer offload" : "") << ": " << gb(x.est.rank.total())
      << " GB, ~" << static_cast<int64_t>(x.time.tokens_per_s()) << " tok/s (model)";
    return b.str();
  };
  s << "ftune memory --fit: " << m.name << " on " << f.gpus << " GPU(s) of " << gb(f.gpu_mem)
    << " GB, seq " << f.base.seq_len << ", " << (f.base.bf16 ? "bf16" : "fp32") << "; "
    << r.searched << " configurations searched, " << r.fitting.size() << " fit\n";
  if (r.fitting.empty()) {
    s << "nothing fits. The closest: " << brief(r.closest) << ", "
      << gb(r.closest.est.rank.total() - f.gpu_mem) << " GB over\n\n";
    s << estimate_table(c, m, r.closest.opts, r.closest.est, f.gpu_mem);
    return s.str();
  }
  const Candidate& best = r.fitting.front();
  s << "best: " << brief(best) << "\n\n" << estimate_table(c, m, best.opts, best.est, f.gpu_mem);
  s << "\nrun it (your YAML recipe, without a lora or quant section for full fine-tuning):\n"
    << "  ftune train" << (best.opts.strategy == Strategy::kSingle || best.opts.strategy == Strategy::kModelParallel
                               ? ""
                               : " --nproc " + std::to_string(best.opts.world_size))
    << " --config YOUR.yaml";
  for (const auto& o : train_overrides(best.opts, m.preset ? "/path/to/" + m.name : m.name)) {
    // Quoted where a shell would read brackets as a glob.
    s << " \\\n      --set " << (o.find('[') != std::string::npos ? "'" + o + "'" : o);
  }
  s << "\n";
  if (best.opts.optimizer == Optimizer::kSgd) s << "(ftune train runs AdamW only; SGD was estimated)\n";
  s << "\nthe fastest that fit, per method:\n";
  for (Method meth : f.methods) {
    for (const Candidate& x : r.fitting) {
      if (method_of(x.opts) != meth) continue;
      s << "  " << brief(x) << "\n";
      break;
    }
  }
  return s.str();
}

}  // namespace ftune::memory
