// `ftune bench`: micro-benchmarks the peer scripts in bench/ compare against.
//   ftune bench forward --preset NAME|--config FILE --batch B --seq-len T [--steps N] [--dtype]
//       forward+backward of the mean causal-LM loss on random ids; prints tokens/s and FLOP/s.
//   ftune bench gemm [--size N]: the machine's fp32/bf16 GEMM rate (the MFU denominator).
//   ftune bench --config FILE --strategies ...: the strategy benchmark (cmd_bench_strategies.cpp).
// Timings exclude a warm-up step. Results print as one JSON line for scripts.
#include <nlohmann/json.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/hf_io.h"
#include "model/loss.h"

namespace ftune::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct BenchArgs {
  std::string preset, config, dtype = "fp32";
  int64_t batch = 1, seq_len = 256, steps = 5, size = 1024, threads = 0;
  bool checkpointing = false;
};

double gemm_flops(int64_t n, at::ScalarType dtype, int64_t reps) {
  at::Tensor a = at::randn({n, n}).to(dtype), b = at::randn({n, n}).to(dtype);
  at::mm(a, b);  // warm-up
  auto t0 = Clock::now();
  for (int64_t i = 0; i < reps; ++i) at::mm(a, b);
  return 2.0 * n * n * n * reps / seconds_since(t0);
}

void run_forward(const BenchArgs& a) {
  if (a.threads > 0) at::set_num_threads(static_cast<int>(a.threads));
  model::LlamaConfig cfg;
  if (!a.preset.empty()) {
    cfg = model::preset_config(a.preset);
  } else {
    cfg = read_config_file(a.config, "--config");
  }
  model::LlamaForCausalLM m(cfg);
  model::init_weights(m, 0);
  at::ScalarType dtype = model::dtype_from_name(a.dtype, "bench forward: --dtype");
  m->to(dtype);
  m->set_grad_checkpointing(a.checkpointing);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor ids = at::randint(cfg.vocab_size, {a.batch, a.seq_len}, gen, at::kLong);
  auto step = [&] {
    m->zero_grad();
    auto loss = model::causal_lm_loss_sum(m->forward(ids), ids);
    (loss.sum / static_cast<double>(loss.count)).backward();
  };
  step();
  auto t0 = Clock::now();
  for (int64_t i = 0; i < a.steps; ++i) step();
  double dt = seconds_since(t0);
  const double tokens = static_cast<double>(a.batch * a.seq_len * a.steps);
  // 6 * params per token for forward+backward, plus attention scores (12 * L * h * s / 2 causal
  // is often quoted; we use the full 12 * L * h * s like the PaLM appendix).
  const double flops_per_token = 6.0 * static_cast<double>(cfg.num_parameters()) +
                                 12.0 * cfg.num_hidden_layers * cfg.hidden_size * a.seq_len;
  nlohmann::json out = {{"impl", "ftune"},
                        {"params", cfg.num_parameters()},
                        {"batch", a.batch},
                        {"seq_len", a.seq_len},
                        {"steps", a.steps},
                        {"threads", at::get_num_threads()},
                        {"seconds", dt},
                        {"tokens_per_s", tokens / dt},
                        {"flops_per_s", tokens / dt * flops_per_token}};
  std::cout << out.dump() << "\n";
}

void run_gemm(const BenchArgs& a) {
  if (a.threads > 0) at::set_num_threads(static_cast<int>(a.threads));
  nlohmann::json out = {{"size", a.size},
                        {"threads", at::get_num_threads()},
                        {"fp32_flops_per_s", gemm_flops(a.size, at::kFloat, 10)},
                        {"bf16_flops_per_s", gemm_flops(a.size, at::kBFloat16, 5)}};
  std::cout << out.dump() << "\n";
}

}  // namespace

void register_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand(
      "bench", "Micro-benchmarks (forward, gemm; see bench/ for the peer comparisons), or the "
               "strategy benchmark: --config FILE --strategies LIST --nproc N --out DIR");
  cmd->require_subcommand(0, 1);
  register_bench_strategies(cmd);
  auto* fwd = cmd->add_subcommand("forward", "Forward+backward tokens/s of a random model");
  auto* shape = fwd->add_option_group("shape", "The model's shape (exactly one)");
  shape->add_option("--preset", a->preset, "Model preset (see init-model --help)")
      ->type_name("NAME");
  shape->add_option("--config", a->config, "HF config.json instead of a preset")->type_name("FILE");
  shape->require_option(1);
  fwd->add_option("--batch", a->batch, "Micro-batch size (default 1)")
      ->type_name("INT")
      ->check(int_at_least(1));
  fwd->add_option("--seq-len", a->seq_len, "Sequence length (default 256)")
      ->type_name("INT")
      ->check(int_at_least(2));
  fwd->add_option("--steps", a->steps, "Timed steps after one warm-up (default 5)")
      ->type_name("INT")
      ->check(int_at_least(1));
  fwd->add_option("--dtype", a->dtype, "fp32 (default) or bf16");
  fwd->add_option("--threads", a->threads, "Intra-op threads (default 0: torch's)")
      ->type_name("INT")
      ->check(int_at_least(0));
  fwd->add_flag("--grad-checkpointing", a->checkpointing, "Recompute layers in backward");
  fwd->callback([a] { run_forward(*a); });
  auto* gemm = cmd->add_subcommand("gemm", "Measured square GEMM FLOP/s, fp32 and bf16");
  gemm->add_option("--size", a->size, "Matrix size (default 1024)")
      ->type_name("INT")
      ->check(int_at_least(1));
  gemm->add_option("--threads", a->threads, "Intra-op threads (default 0: torch's)")
      ->type_name("INT")
      ->check(int_at_least(0));
  gemm->callback([a] { run_gemm(*a); });
}

}  // namespace ftune::cli
