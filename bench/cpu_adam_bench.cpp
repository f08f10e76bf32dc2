// Times one AdamW step on CPU fp32 parameters (bench/cpu_adam.sh runs it and torch's optimizers
// alike): ftune's AdamW with cpu_kernel (optim::cpu_adamw_step per tensor) and with the fused
// at::_fused_adamw_ path, over the same parameters and gradients, weight decay 0.01 on the 2-D
// tensors. Prints one JSON line per implementation with the median step time of --steps steps
// after one warm-up, and the memory traffic that implies (7 fp32 streams: p, g, m, v read; p, m,
// v written). Layouts: smollm2-135m (SmolLM2-135M's 272 tensors) or flat (one tensor).
//   cpu_adam_bench --layout smollm2-135m|flat [--numel N] [--threads T] [--steps S] [--shapes 1]
// (--shapes 1 prints the layout's shapes as a JSON list and exits, for the torch side.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "optim/adamw.h"
#include "optim/cpu_adam.h"

namespace {

std::vector<std::vector<int64_t>> layout_shapes(const std::string& layout, int64_t numel) {
  if (layout == "flat") return {{numel}};
  // SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads of 64 / 3 kv heads, tied
  // 49152-token embedding.
  std::vector<std::vector<int64_t>> s = {{49152, 576}};
  for (int l = 0; l < 30; ++l) {
    for (auto shape : std::vector<std::vector<int64_t>>{{576, 576}, {192, 576}, {192, 576},
                                                        {576, 576}, {1536, 576}, {1536, 576},
                                                        {576, 1536}, {576}, {576}}) {
      s.push_back(shape);
    }
  }
  s.push_back({576});
  return s;
}

double median_step_ms(ftune::optim::AdamW& opt, int steps) {
  std::vector<double> ms;
  for (int i = 0; i <= steps; ++i) {  // step 0 warms up (first-touch of the state pages)
    const auto t0 = std::chrono::steady_clock::now();
    opt.step(1e-4);
    const auto t1 = std::chrono::steady_clock::now();
    if (i > 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string layout = "smollm2-135m";
  int64_t numel = 10'000'000;
  int threads = 1, steps = 5;
  bool shapes_only = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layout") layout = v;
    else if (k == "--numel") numel = std::stoll(v);
    else if (k == "--threads") threads = std::stoi(v);
    else if (k == "--steps") steps = std::stoi(v);
    else if (k == "--shapes") shapes_only = v == "1";
    else {
      std::fprintf(stderr, "cpu_adam_bench: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (shapes_only) {
    std::string out = "[";
    for (const auto& shape : layout_shapes(layout, numel)) {
      out += out.size() > 1 ? ", [" : "[";
      for (size_t d = 0; d < shape.size(); ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
      out += "]";
    }
    std::printf("%s]\n", out.c_str());
    return 0;
  }
  at::set_num_threads(threads);
  at::manual_seed(0);
  ftune::optim::NamedTensors params;
  int64_t total = 0;
  for (const auto& shape : layout_shapes(layout, numel)) {
    at::Tensor p = at::randn(shape);
    p.mutable_grad() = at::randn(shape) * 1e-3;
    total += p.numel();
    params.emplace_back("p" + std::to_string(params.size()), p);
  }
  for (const bool cpu_kernel : {true, false}) {
    ftune::optim::AdamWOptions o;
    o.weight_decay = 0.01;
    o.cpu_kernel = cpu_kernel;
    ftune::optim::AdamW opt(params, o);
    const double ms = median_step_ms(opt, steps);
    const std::string impl = cpu_kernel ? std::string("ftune cpu_adamw_step (") +
                                              ftune::optim::cpu_adam_isa() + ")"
                                        : "ftune at::_fused_adamw_";
    std::printf(
        "{\"impl\": \"%s\", \"layout\": \"%s\", \"numel\": %lld, \"tensors\": %zu, "
        "\"threads\": %d, \"steps\": %d, \"median_ms\": %.3f, \"gb_per_s\": %.2f}\n",
        impl.c_str(), layout.c_str(), static_cast<long long>(total), params.size(), threads, steps,
        ms, 7.0 * 4 * total / (ms * 1e6));
    std::fflush(stdout);
  }
  return 0;
}
