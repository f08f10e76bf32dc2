// Test driver for the PEFT parity tests (tests/python/test_lora_peft.py).
//   lora_tool init --model DIR --out ADAPTER --r 4 --alpha 8 --targets q_proj,v_proj [--rslora]
//                  [--layers 0,1] [--seed S]
//     applies LoRA to the model (apply_lora; with --layers only those decoder layers), fills B with
//     seeded random values too (PEFT's B starts at zero, which would hide every B-side bug) and
//     writes the adapter with save_adapter.
//   lora_tool logits --model DIR [--adapter DIR] [--merge] [--dtype bf16] --ids ids.json
//                    --out out.safetensors
//     loads the model (and the adapter, unmerged; with --merge merged by merge_lora) and writes
//     its logits for the ids, plus "lora_params" (how many adapter parameters the model holds).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <iostream>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"
#include "lora/adapter.h"
#include "model/hf_io.h"

namespace {
using namespace ftune;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

int init(const std::string& model_dir, const std::string& out, const lora::LoraOptions& o,
         const std::string& layers, uint64_t seed) {
  auto m = model::load_model(model_dir);
  if (layers.empty()) {
    lora::apply_lora(m, o, seed);
  } else {
    std::set<std::string> want;
    for (const auto& l : split(layers)) want.insert("model.layers." + l + ".");
    const auto targets = lora::resolve_targets(o.targets, "--targets");
    lora::apply_lora_to(m, o, seed, [&](const std::string& name) {
      const std::string leaf = name.substr(name.rfind('.') + 1);
      bool layer_ok = false;
      for (const auto& w : want) layer_ok |= name.rfind(w, 0) == 0;
      return layer_ok && std::find(targets.begin(), targets.end(), leaf) != targets.end();
    });
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1000);
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : lora::adapter_parameters(m)) {
    if (name.find("lora_B") != std::string::npos) {
      p.copy_(at::empty(p.sizes(), at::kFloat).normal_(0.0, 0.2, gen));
    }
  }
  lora::save_adapter(out, m, model_dir);
  return 0;
}

int logits(const std::string& model_dir, const std::string& adapter, bool merge,
           const std::string& dtype, const std::string& ids_path, const std::string& out) {
  model::LoadOptions lo;
  if (!dtype.empty()) lo.dtype = model::dtype_from_name(dtype, "--dtype");
  auto m = model::load_model(model_dir, lo);
  if (!adapter.empty()) lora::load_adapter(adapter, m);
  if (merge) lora::merge_lora(m);
  m->eval();
  auto rows = nlohmann::json::parse(read_file(ids_path)).get<std::vector<std::vector<int64_t>>>();
  at::Tensor ids = at::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())},
                             at::kLong);
  for (size_t i = 0; i < rows.size(); ++i) ids[i] = at::tensor(rows[i], at::kLong);
  torch::NoGradGuard no_grad;
  io::TensorList tensors;
  tensors.emplace_back("logits", m->forward(ids).to(at::kFloat));
  tensors.emplace_back("lora_params",
                       at::tensor({static_cast<int64_t>(lora::adapter_parameters(m).size())}));
  io::save_safetensors(out, tensors);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftune LoRA test driver"};
  app.require_subcommand(1);
  std::string model_dir, out, targets = "q_proj,v_proj", layers, adapter, ids, dtype;
  lora::LoraOptions o;
  int64_t seed = 0;
  bool merge = false;
  auto* ini = app.add_subcommand("init", "write a random adapter with save_adapter");
  ini->add_option("--model", model_dir)->required();
  ini->add_option("--out", out)->required();
  ini->add_option("--r", o.r);
  ini->add_option("--alpha", o.alpha);
  ini->add_option("--targets", targets);
  ini->add_flag("--rslora", o.rslora);
  ini->add_option("--layers", layers);
  ini->add_option("--seed", seed);
  auto* lg = app.add_subcommand("logits", "forward with an adapter, logits to safetensors");
  lg->add_option("--model", model_dir)->required();
  lg->add_option("--adapter", adapter);
  lg->add_flag("--merge", merge);
  lg->add_option("--dtype", dtype);
  lg->add_option("--ids", ids)->required();
  lg->add_option("--out", out)->required();
  CLI11_PARSE(app, argc, argv);
  try {
    if (ini->parsed()) {
      o.targets = split(targets);
      return init(model_dir, out, o, layers, static_cast<uint64_t>(seed));
    }
    return logits(model_dir, adapter, merge, dtype, ids, out);
  } catch (const std::exception& e) {
    std::cerr << "lora_tool: error: " << e.what() << "\n";
    return 1;
  }
}
