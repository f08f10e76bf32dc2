// Test and profiling driver for the target-only chunked loss (tests/python/test_loss.py) and for a
// full fine-tuning step op by op (bench/profile_step.py):
//   loss_tool grad --model DIR --batch in.safetensors --out out.safetensors [--plain] [--bf16]
//             [--chunk N] [--freeze-head]
//     input_ids/labels [B, T] from `in`; loss (chunked, or --plain: full logits +
//     causal_lm_loss_sum), backward of 0.37 * sum, writes loss, count and grad.<param>.
//   loss_tool memory --model DIR --batch B --seq T [--plain] [--bf16]
//     peak RSS above the pre-step RSS (VmHWM reset after load) over one forward + backward of
//     random ids with labels = ids; one JSON line.
//   loss_tool profile --model DIR --batch B --seq T --steps N --trace FILE [--docs K] [--plain]
//             [--clip X] [--wd X]
//     N training steps as train_loop runs them (forward_loss, backward, AdamW::clip_and_step); the
//     steps after the first under the autograd profiler, written as a chrome trace; K > 1 splits
//     every row into K documents with the block-diagonal mask, K = 1 is plain causal attention.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <fstream>
#include <iostream>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/autocast.h"
#include "model/hf_io.h"
#include "model/loss.h"
#include "proc_status.h"
#include "optim/adamw.h"

namespace {

using namespace ftune;

model::LossSum loss_of(model::LlamaForCausalLM& m, const at::Tensor& ids, const at::Tensor& labels,
                       const model::ForwardOptions& fo, bool plain, int64_t chunk) {
  if (plain) return model::causal_lm_loss_sum(m->forward(ids, fo), labels);
  return model::chunked_lm_loss_sum(m->hidden_states(ids, fo), m->lm_head_weight(), labels, chunk);
}

int grad(model::LlamaForCausalLM& m, const std::string& batch, const std::string& out, bool plain,
         bool bf16, int64_t chunk, bool freeze_head) {
  io::SafetensorsReader in(batch);
  const at::Tensor ids = in.tensor("input_ids").clone(), labels = in.tensor("labels").clone();
  if (freeze_head) m->lm_head_weight().requires_grad_(false);
  model::LossSum ls;
  {
    model::AutocastScope autocast(at::kCPU, bf16);
    ls = loss_of(m, ids, labels, {}, plain, chunk);
  }
  (ls.sum * 0.37).backward();
  io::TensorList tensors;
  tensors.emplace_back("loss", ls.sum.detach().reshape({1}));
  tensors.emplace_back("count", at::tensor({ls.count}, at::kLong));
  for (const auto& p : m->named_parameters()) {
    if (p.value().grad().defined()) tensors.emplace_back("grad." + p.key(), p.value().grad());
  }
  io::save_safetensors(out, tensors);
  return 0;
}

int memory(model::LlamaForCausalLM& m, int64_t B, int64_t T, bool plain, bool bf16) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  at::Tensor ids = at::randint(m->config().vocab_size, {B, T}, gen, at::kLong);
  std::ofstream("/proc/self/clear_refs") << "5";  // VmHWM := current RSS
  const int64_t before = proc_status_bytes("VmRSS");
  double loss = 0;
  {
    model::LossSum ls;
    {
      model::AutocastScope autocast(at::kCPU, bf16);
      ls = loss_of(m, ids, ids, {}, plain, 0);
    }
    (ls.sum / static_cast<double>(ls.count)).backward();
    loss = ls.sum.item<double>() / static_cast<double>(ls.count);
  }
  const int64_t peak = proc_status_bytes("VmHWM");
  nlohmann::json j = {{"mode", plain ? "plain" : "chunked"}, {"rss_before", before},
                      {"peak", peak}, {"peak_above", peak - before}, {"loss", loss}};
  std::cout << j.dump() << "\n";
  return 0;
}

// Row r split into `docs` equal documents: positions restart, mask block-diagonal and causal.
std::pair<at::Tensor, at::Tensor> packed_mask(int64_t B, int64_t T, int64_t docs) {
  at::Tensor t = at::arange(T, at::kLong);
  const int64_t len = (T + docs - 1) / docs;
  at::Tensor seg = (t / len).expand({B, T});
  at::Tensor pos = (t % len).expand({B, T}).contiguous();
  at::Tensor causal = at::ones({T, T}, at::kBool).tril();
  at::Tensor mask = (seg.unsqueeze(2) == seg.unsqueeze(1)).logical_and_(causal).unsqueeze(1);
  return {pos, mask};
}

int profile(model::LlamaForCausalLM& m, int64_t B, int64_t T, int64_t steps, int64_t docs,
            bool plain, double clip, double wd, const std::string& trace) {
  optim::NamedTensors params;
  for (const auto& p : m->named_parameters()) params.emplace_back(p.key(), p.value());
  optim::AdamWOptions ao;
  ao.weight_decay = wd;
  optim::AdamW opt(params, ao);
  model::ForwardOptions fo;
  if (docs > 1) std::tie(fo.positions, fo.attn_mask) = packed_mask(B, T, docs);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  std::vector<double> step_s;
  auto one_step = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    at::Tensor ids = at::randint(m->config().vocab_size, {B, T}, gen, at::kLong);
    opt.zero_grad();
    model::LossSum ls = loss_of(m, ids, ids, fo, plain, 0);
    (ls.sum / static_cast<double>(ls.count)).backward();
    opt.clip_and_step(1e-4, clip);
    step_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  };
  one_step();  // warm-up, not profiled
  {
    torch::autograd::profiler::RecordProfile guard(trace);
    for (int64_t s = 1; s < steps; ++s) one_step();
  }
  std::cout << nlohmann::json({{"step_s", step_s}}).dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftune loss test and profiling driver"};
  app.require_subcommand(1);
  std::string model_dir, batch, out, trace;
  bool plain = false, bf16 = false, freeze_head = false;
  int64_t chunk = 0, B = 2, T = 256, steps = 4, docs = 1;
  double clip = 1.0, wd = 0.01;
  auto* g = app.add_subcommand("grad", "loss and gradients of a batch");
  auto* mem = app.add_subcommand("memory", "peak RSS of one forward + backward");
  auto* prof = app.add_subcommand("profile", "profile training steps");
  for (auto* c : {g, mem, prof}) {
    c->add_option("--model", model_dir)->required();
    c->add_flag("--plain", plain, "full logits + causal_lm_loss_sum");
  }
  for (auto* c : {g, mem}) c->add_flag("--bf16", bf16, "bf16 autocast");
  g->add_option("--batch", batch)->required();
  g->add_option("--out", out)->required();
  g->add_option("--chunk", chunk);
  g->add_flag("--freeze-head", freeze_head);
  for (auto* c : {mem, prof}) {
    c->add_option("--batch", B);
    c->add_option("--seq", T);
  }
  prof->add_option("--steps", steps);
  prof->add_option("--docs", docs);
  prof->add_option("--clip", clip);
  prof->add_option("--wd", wd);
  prof->add_option("--trace", trace)->required();
  CLI11_PARSE(app, argc, argv);
  try {
    auto m = model::load_model(model_dir);
    if (g->parsed()) return grad(m, batch, out, plain, bf16, chunk, freeze_head);
    if (mem->parsed()) return memory(m, B, T, plain, bf16);
    return profile(m, B, T, steps, docs, plain, clip, wd, trace);
  } catch (const std::exception& e) {
    std::cerr << "loss_tool: error: " << e.what() << "\n";
    return 1;
  }
}
