// Test driver for tests/python/test_train.py: runs ftune's AdamW on given parameters and gradients
// so the test can compare it with torch.optim.AdamW directly (no model, no data in between).
//   adamw_tool <in.safetensors> <out.safetensors>
// in: "param.<name>" (initial values) and "grad.<step>.<name>" for steps 0..N-1; metadata "lrs"
// (comma-separated, one per step), "beta1", "beta2", "eps", "weight_decay", "fused" ("0"/"1"),
// optional "max_grad_norm" (steps with AdamW::clip_and_step) and "cpu_kernel" ("0"/"1").
// out: "param.<name>" after the N steps, plus AdamW::state() ("<name>.exp_avg", ...) and, with
// max_grad_norm, "norms" (the norm before clipping of each step, fp64).
#include <cstdio>
#include <sstream>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"
#include "optim/adamw.h"

int main(int argc, char** argv) {
  try {
    FTUNE_CHECK(argc == 3, "usage: adamw_tool <in.safetensors> <out.safetensors>");
    ftune::io::SafetensorsReader in(argv[1]);
    const auto meta = in.metadata();
    ftune::optim::AdamWOptions o;
    o.beta1 = std::stod(meta.at("beta1"));
    o.beta2 = std::stod(meta.at("beta2"));
    o.eps = std::stod(meta.at("eps"));
    o.weight_decay = std::stod(meta.at("weight_decay"));
    o.fused = meta.at("fused") == "1";
    o.cpu_kernel = meta.count("cpu_kernel") && meta.at("cpu_kernel") == "1";
    std::vector<double> lrs;
    std::stringstream ss(meta.at("lrs"));
    for (std::string item; std::getline(ss, item, ',');) lrs.push_back(std::stod(item));

    ftune::optim::NamedTensors params;
    for (const auto& name : in.names()) {
      if (name.rfind("param.", 0) == 0) params.emplace_back(name.substr(6), in.tensor(name).clone());
    }
    ftune::optim::AdamW opt(params, o);
    std::vector<double> norms;  // with max_grad_norm: AdamW::clip_and_step's norm per step
    for (size_t k = 0; k < lrs.size(); ++k) {
      for (auto& [name, p] : opt.params()) {
        p.mutable_grad() = in.tensor("grad." + std::to_string(k) + "." + name).clone();
      }
      if (meta.count("max_grad_norm")) {
        norms.push_back(opt.clip_and_step(lrs[k], std::stod(meta.at("max_grad_norm"))));
      } else {
        opt.step(lrs[k]);
      }
    }
    ftune::io::TensorList out;
    for (const auto& [name, p] : opt.params()) out.emplace_back("param." + name, p);
    for (auto& t : opt.state()) out.push_back(std::move(t));
    if (!norms.empty()) out.emplace_back("norms", at::tensor(norms, at::kDouble));
    ftune::io::save_safetensors(argv[2], out);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adamw_tool: error: %s\n", e.what());
    return 1;
  }
}
