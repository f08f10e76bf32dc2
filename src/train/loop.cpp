// The training loop; see loop.h.
#include "train/loop.h"

#include <ATen/core/grad_mode.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "memory/tracker.h"
#include "model/autocast.h"
#include "model/loss.h"
#include "train/checkpoint_sharded.h"
#include "train/report.h"

namespace ftune::train {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Loss sum (fp32 scalar, differentiable) and its target count for one micro-batch. The loss
// projects only the positions that carry a target (model::chunked_lm_loss_sum), so the full
// [B, T, V] logits never exist. A batch whose rows each hold one document goes without the dense
// mask: SDPA's is_causal path skips the masked half of the attention.
model::LossSum forward_loss(model::LlamaForCausalLM& m, const data::Batch& b, bool bf16,
                            at::Device device) {
  model::AutocastScope autocast(device.type(), bf16);
  model::ForwardOptions fo;
  fo.positions = b.positions.to(device);
  if (!b.causal) fo.attn_mask = b.attn_mask.to(device);
  at::Tensor hidden = m->hidden_states(b.input_ids.to(device), fo);  // [B, T, H]
  // Under model parallelism the head sits on the last stage's device (a tied weight is copied
  // there, differentiably).
  return model::chunked_lm_loss_sum(hidden, m->lm_head_weight().to(hidden.device()),
                                    b.labels.to(hidden.device()));
}

void dump_batches(const std::filesystem::path& dir, int64_t step,
                  const std::vector<data::Batch>& micro, double lr) {
  io::TensorList t;
  for (size_t i = 0; i < micro.size(); ++i) {
    const std::string p = "mb" + std::to_string(i) + ".";
    t.emplace_back(p + "input_ids", micro[i].input_ids);
    t.emplace_back(p + "labels", micro[i].labels);
    t.emplace_back(p + "positions", micro[i].positions);
    t.emplace_back(p + "attn_mask", micro[i].attn_mask);
  }
  char lr_text[64];
  std::snprintf(lr_text, sizeof(lr_text), "%.17g", lr);
  io::save_safetensors(dir / ("step-" + std::to_string(step) + ".safetensors"), t,
                       {{"lr", lr_text}, {"micro_batches", std::to_string(micro.size())}});
}

// Test seam: FTUNE_TEST_NAN_AT="<rank>:<step>[,<step>...]" makes that rank's loss NaN at those
// steps (the loop's own forward; not under a pipeline), so its gradients are NaN too: how the
// tests feed a divergence to training.nonfinite.
std::set<int64_t> poisoned_steps(int rank) {
  std::set<int64_t> out;
  const char* spec = std::getenv("FTUNE_TEST_NAN_AT");
  if (spec == nullptr) return out;
  const std::string s = spec;
  const auto colon = s.find(':');
  if (colon == std::string::npos || s.substr(0, colon) != std::to_string(rank)) return out;
  std::stringstream steps(s.substr(colon + 1));
  for (std::string item; std::getline(steps, item, ',');) {
    if (!item.empty()) out.insert(std::stoll(item));
  }
  return out;
}

std::string step_line(double loss, double lr, double gnorm, double tok_s) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "loss %.4f lr %.3e grad_norm %.3f %.0f tok/s", loss, lr, gnorm,
                tok_s);
  return buf;
}

}  // namespace

EvalResult evaluate(model::LlamaForCausalLM& m, const std::vector<data::Batch>& batches,
                    bool bf16_autocast, at::Device device) {
  at::NoGradGuard no_grad;
  m->eval();
  double sum = 0;
  int64_t count = 0;
  for (const auto& b : batches) {
    auto ls = forward_loss(m, b, bf16_autocast, device);
    sum += ls.sum.item<double>();
    count += ls.count;
  }
  m->train();
  EvalResult r;
  r.tokens = count;
  r.loss = count > 0 ? sum / static_cast<double>(count) : std::nan("");
  r.ppl = std::exp(r.loss);
  return r;
}

TrainState train_loop(model::LlamaForCausalLM& m, Strategy& strategy, optim::AdamW& opt,
                      data::BatchStream& train, const std::vector<data::Batch>& valid,
                      TrainState state, const LoopOptions& o, MetricsLog& metrics) {
  const bool main = strategy.is_main();
  const bool distributed = strategy.world_size() > 1;
  const DataShard shard = strategy.data_shard();
  const int64_t end = o.stop_after > 0 ? std::min(o.stop_after, o.total_steps) : o.total_steps;
  Progress progress(o.total_steps, state.step, o.progress_bar && main);
  // Under data parallelism every rank dumps the rows it trained on, in its own folder.
  const auto batch_dir =
      distributed ? o.output_dir / "batches" / ("rank" + std::to_string(strategy.rank()))
                  : o.output_dir / "batches";
  if (o.dump_batches) std::filesystem::create_directories(batch_dir);
  m->train();

  // This rank's share of the validation batches (batch i goes to rank i % ranks).
  std::vector<data::Batch> my_valid;
  for (size_t i = 0; i < valid.size(); ++i) {
    if (static_cast<int64_t>(i) % shard.count == shard.index) my_valid.push_back(valid[i]);
  }

  // Evaluates on the validation rows and adds eval_loss/eval_ppl to `rec`.
  auto run_eval = [&](int64_t step, nlohmann::json& rec) {
    const auto te = Clock::now();
    EvalResult ev;
    if (MicroBatchRunner* r = strategy.runner()) {  // pipeline stages: each runs its share
      const auto [sum, count] = r->eval_sums(m, my_valid, o.bf16_autocast);
      ev.tokens = count;
      ev.loss = count > 0 ? sum / static_cast<double>(count) : std::nan("");
      ev.ppl = std::exp(ev.loss);
    } else {
      ev = evaluate(m, my_valid, o.bf16_autocast, o.device);
    }
    if (distributed) {  // each rank evaluated its share: sum the NLL and the token counts
      const double local = ev.tokens > 0 ? ev.loss * static_cast<double>(ev.tokens) : 0.0;
      const double sum = strategy.global_sum(local);
      ev.tokens = strategy.global_sum(ev.tokens);
      ev.loss = ev.tokens > 0 ? sum / static_cast<double>(ev.tokens) : std::nan("");
      ev.ppl = std::exp(ev.loss);
    }
    state.last_eval_loss = ev.loss;
    state.last_eval_step = step;
    rec["eval_loss"] = ev.loss;
    rec["eval_ppl"] = ev.ppl;
    if (main) {
      char buf[160];
      std::snprintf(buf, sizeof(buf), "eval step %lld: loss %.4f ppl %.3f (%lld tokens, %.1f s)",
                    static_cast<long long>(step), ev.loss, ev.ppl,
                    static_cast<long long>(ev.tokens), seconds_since(te));
      progress.message(buf);
    }
  };
  if (o.eval_at_start && state.step == 0 && !valid.empty()) {
    nlohmann::json rec = {{"step", 0}};
    run_eval(0, rec);
    if (main) metrics.write(rec);
  }

  const int64_t first_step = state.step + 1;
  const bool trace_memory = o.measure_memory && std::getenv("FTUNE_MEMORY_TRACE") != nullptr;
  const std::set<int64_t> poisoned = poisoned_steps(strategy.rank());
  int64_t skipped_in_a_row = 0;
  strategy.take_comm_stats();  // start-up traffic (the parameter broadcast) is not a step's
  // Throughput over the interval since the last metrics line.
  int64_t interval_tokens = 0, interval_steps = 0;
  double interval_s = 0;
  parallel::CommStats interval_comm;  // summed over the steps since the last metrics line

  while (state.step < end) {
    const auto t0 = Clock::now();
    const int64_t index = state.step;  // 0-based index of this optimizer step
    const int64_t step = index + 1;
    const double lr = optim::lr_at(o.schedule, index);
    const bool last = step == o.total_steps;
    const bool do_eval = !valid.empty() && ((o.eval_every > 0 && step % o.eval_every == 0) || last);
    const bool do_log = step % o.log_every == 0 || do_eval || last || step == end;
    strategy.mark_step(step);
    // The measured peak is the step's own (data, forward, backward, optimizer), not an eval's or a
    // checkpoint gather's, which the estimator does not predict.
    if (o.measure_memory) memory::reset_tensor_peak(o.device);
    // FTUNE_MEMORY_TRACE=1: this rank's live tensor bytes and the step's running peak after each
    // phase, on stderr: which phase makes the peak (docs/memory.md, "Checking an estimate").
    auto trace = [&](const char* phase) {
      if (!trace_memory) return;
      const memory::TensorBytes b = memory::tensor_bytes(o.device);
      std::fprintf(stderr, "memory trace: step %lld rank %lld %-14s live %9.2f MB  peak %9.2f MB\n",
                   static_cast<long long>(step), static_cast<long long>(strategy.rank()), phase,
                   static_cast<double>(b.live) / 1e6, static_cast<double>(b.peak) / 1e6);
    };

    std::vector<data::Batch> micro;
    int64_t local_targets = 0, local_tokens = 0;
    for (int64_t i = 0; i < o.grad_accum; ++i) {
      micro.push_back(train.next(o.micro_batch, shard.index, shard.count));
      local_targets += micro.back().target_tokens;
      local_tokens += micro.back().input_ids.numel();
    }
    if (o.dump_batches) dump_batches(batch_dir, step, micro, lr);
    double target_fraction = 0;  // the loss's working set follows the micro-batch's targets
    for (const auto& b : micro) {
      target_fraction = std::max(target_fraction, static_cast<double>(b.target_tokens) /
                                                      static_cast<double>(b.input_ids.numel()));
    }
    state.max_target_fraction = std::max(state.max_target_fraction, target_fraction);
    const int64_t targets = strategy.global_sum(local_targets);
    const int64_t tokens = distributed ? strategy.global_sum(local_tokens) : local_tokens;
    // A batch of prompts only (no targets) contributes zero loss rather than 0/0.
    const double denom = static_cast<double>(std::max<int64_t>(targets, 1));

    opt.zero_grad();
    double loss_sum = 0;
    if (MicroBatchRunner* r = strategy.runner()) {  // pipeline stages, in the schedule's order
      loss_sum = r->train_step(m, micro, denom, o.bf16_autocast);
    } else {
      for (size_t i = 0; i < micro.size(); ++i) {
        const auto& b = micro[i];
        model::LossSum ls = forward_loss(m, b, o.bf16_autocast, o.device);
        at::Tensor loss = ls.sum / denom;
        if (i == 0 && poisoned.count(step)) loss = loss * std::nan("");
        strategy.before_backward(i + 1 == micro.size());
        loss.backward();
        loss_sum += i == 0 && poisoned.count(step) ? std::nan("") : ls.sum.item<double>();
      }
    }
    trace("backward");
    loss_sum = strategy.global_sum(loss_sum);
    // Gradient bytes held at their peak in the step (logged steps only): after the backward, or
    // after the sync (a sharded strategy may swap the full gradients for its shard's).
    const int64_t grads_after_backward = do_log ? gradient_bytes(m, opt) : 0;
    strategy.after_backward(opt.params());
    trace("gradient sync");
    const int64_t held_grads = do_log ? std::max(grads_after_backward, gradient_bytes(m, opt)) : 0;
    // The loss is summed over the ranks and the norm taken over all of them, so every rank sees
    // the same values and takes the same decision. A non-finite one drops the update (AdamW
    // leaves parameters and state as they were).
    if (!std::isfinite(loss_sum)) opt.skip_next_step();
    const double gnorm = strategy.clip_and_step(opt, lr, o.max_grad_norm);
    trace("optimizer step");
    const int64_t step_peak = o.measure_memory ? memory::tensor_bytes(o.device).peak : 0;
    state.step_peak_bytes = std::max(state.step_peak_bytes, step_peak);
    const double loss = loss_sum / denom;
    // A NaN on the first step is always a setup fault.
    FTUNE_CHECK(step != first_step || std::isfinite(loss), "step ", step, ": loss is ", loss,
                ": check the model weights (model.path) for NaN/inf values, model.dtype, and that "
                "the data gives target tokens");
    const bool skipped = !std::isfinite(loss) || !std::isfinite(gnorm);
    if (skipped) {
      FTUNE_CHECK(o.skip_nonfinite, "step ", step, ": the loss (", loss, ") or the gradient norm (",
                  gnorm, ") is not finite (training.nonfinite: stop): the update was not applied "
                  "and the last checkpoint is kept; resume from it with a lower training.lr or "
                  "training.max_grad_norm, or set training.nonfinite: skip");
      ++skipped_in_a_row;
      FTUNE_CHECK(skipped_in_a_row <= o.max_skipped, "step ", step, ": ", skipped_in_a_row,
                  " steps in a row had a non-finite loss or gradient norm, more than "
                  "training.max_skipped (", o.max_skipped, "): the run diverged; the last "
                  "checkpoint is kept");
      if (main) {
        char buf[200];
        std::snprintf(buf, sizeof(buf), "step %lld: skipped: loss %g, grad_norm %g not finite "
                      "(%lld in a row; training.nonfinite: skip)", static_cast<long long>(step),
                      loss, gnorm, static_cast<long long>(skipped_in_a_row));
        progress.message(buf);
      }
    } else {
      skipped_in_a_row = 0;
    }

    // Preemption: a stop signal on any rank ends the run after this step, with a checkpoint (the
    // ranks agree here, so the flag's all-reduce counts in this step's traffic).
    const int signal = o.stop_signal ? o.stop_signal() : 0;
    const bool preempted =
        step < o.total_steps && (distributed ? strategy.any_rank(signal != 0) : signal != 0);
    if (preempted) state.stop_signal = signal != 0 ? signal : SIGTERM;

    state.step = step;
    state.epoch = train.epoch();
    state.position = train.position();
    state.tokens_seen += tokens;
    state.last_loss = loss;
    const double dt = seconds_since(t0);
    state.elapsed_s += dt;
    interval_tokens += tokens;
    interval_s += dt;
    ++interval_steps;
    if (distributed) {
      const parallel::CommStats cs = strategy.take_comm_stats();
      interval_comm += cs;
      state.comm_bytes += cs.total_wire();
      state.comm_exposed_s += cs.wait_s;
    }

    const double tok_s = interval_s > 0 ? static_cast<double>(interval_tokens) / interval_s : 0;

    if (main) progress.update(step, step_line(loss, lr, gnorm, tok_s), do_log);
    nlohmann::json rec;
    if (do_log) {
      rec = {{"step", step},
             {"loss", loss},
             {"lr", lr},
             {"grad_norm", gnorm},
             {"tokens_per_s", tok_s},
             {"mfu", o.peak_flops > 0 ? o.flops_per_token * tok_s / o.peak_flops : 0.0},
             {"peak_mem_bytes", peak_memory_bytes(o.device)},
             {"tokens", state.tokens_seen},
             {"target_tokens", targets},
             {"epoch", state.epoch}};
      if (skipped) rec["skipped"] = true;
      if (o.measure_memory) rec["step_peak_tensor_bytes"] = step_peak;
      if (o.predict_peak_bytes) {
        const int64_t predicted = o.predict_peak_bytes(std::max(target_fraction, 1e-6));
        if (predicted > 0) rec["predicted_peak_bytes"] = predicted;
      }
      {
        // What this rank holds (its own tensors, counted): parameters, gradients at their peak
        // in the step, optimizer state, communication buffers.
        const ParamReport pr = param_report(m, opt);
        const int64_t sharded = strategy.held_param_bytes();
        rec["held_param_bytes"] = sharded >= 0 ? sharded : pr.base_bytes + pr.trainable_bytes;
        rec["held_gathered_peak_bytes"] = strategy.take_peak_gathered_bytes();
        rec["held_grad_bytes"] = held_grads;
        rec["held_optimizer_bytes"] = pr.optimizer_bytes;
        rec["held_buffer_bytes"] = strategy.buffer_bytes();
      }
      if (MicroBatchRunner* r = strategy.runner()) rec.update(r->step_metrics());
      if (distributed) {
        // Per optimizer step, averaged over the steps since the last line: payload and ring
        // bytes by collective, and the seconds rank 0 waited on communication.
        const auto per_step = [&](const std::map<std::string, int64_t>& m) {
          nlohmann::json j = nlohmann::json::object();
          for (const auto& [k, v] : m) j[k] = v / interval_steps;
          return j;
        };
        rec["comm_bytes"] = per_step(interval_comm.payload_bytes);
        rec["comm_wire_bytes"] = per_step(interval_comm.wire_bytes);
        rec["comm_exposed_s"] = interval_comm.wait_s / static_cast<double>(interval_steps);
        rec["comm_exposed_frac"] = interval_s > 0 ? interval_comm.wait_s / interval_s : 0.0;
        interval_comm = parallel::CommStats{};
      }
      interval_tokens = 0;
      interval_steps = 0;
      interval_s = 0;
    }
    if (do_eval) run_eval(step, rec);
    if (do_log && main) metrics.write(rec);

    const bool stopping = (step == end && end < o.total_steps) || preempted;
    if ((o.save_every > 0 && (step % o.save_every == 0 || last)) || stopping) {
      const auto tc = Clock::now();
      std::filesystem::path dir;
      // Under a sharding strategy every rank writes its own pieces (checkpoint_sharded.h); else
      // rank 0 writes the single-process format (a strategy's state gathered for it first).
      const std::vector<PieceInfo> layout = strategy.piece_layout();
      if (!layout.empty()) {
        dir = save_sharded_checkpoint(o.output_dir, layout, opt, state, o.keep_last,
                                      o.checkpoint_meta, o.tokenizer_dir, strategy, o.device,
                                      o.save_wait_s);
      } else {
        const optim::NamedTensors opt_state = strategy.optimizer_state(opt);  // every rank
        if (main) {
          dir = save_checkpoint(o.output_dir, m, opt, state, o.keep_last, o.checkpoint_meta,
                                o.tokenizer_dir, o.base_model, &opt_state);
        }
      }
      if (main) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), " (%.1f s)", seconds_since(tc));
        progress.message("saved checkpoint " + dir.string() + buf);
      }
      // The other ranks wait here, not in the next step's first collective, whose timeout a
      // long save could exceed.
      if (distributed) strategy.barrier("barrier after the checkpoint of step " +
                                        std::to_string(step), o.save_wait_s);
    }
    if (preempted) break;
  }
  progress.finish();
  return state;
}

}  // namespace ftune::train
