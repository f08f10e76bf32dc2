// Test driver for the model parity tests (tests/python/test_model_parity.py): loads an HF model
// dir with ftune, runs forward (and optionally backward of the mean causal-LM loss) on the ids in
// a JSON file, and writes logits and every weight gradient to a safetensors file that the Python
// side compares against transformers.
//   model_tool --model DIR --ids ids.json --out out.safetensors [--dtype bf16] [--grad]
//              [--checkpointing] [--save DIR] [--device cuda]
// --device runs the model there (tests/python/test_gpu.py) with TF32 off for fp32 matmuls; the
// outputs are always written from CPU copies.
// `load-memory` (tests/python/test_model_load.py) loads a model and prints one JSON line: RSS
// before the load, peak RSS (VmHWM, reset before the load) after it, the weights' bytes, the load
// time, and the sum of every parameter (fp64) for comparison with the file.
//   model_tool load-memory --model DIR [--dtype bf16]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <iostream>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"
#include "model/device.h"
#include "model/hf_io.h"
#include "model/loss.h"
#include "proc_status.h"

namespace {

int load_memory(const std::string& model_dir, const std::string& dtype) {
  using namespace ftune;
  model::LoadOptions lo;
  if (!dtype.empty()) lo.dtype = model::dtype_from_name(dtype, "--dtype");
  at::ones({8}).sum();  // initialize ATen's CPU backend before the baseline
  std::ofstream("/proc/self/clear_refs") << "5";  // reset VmHWM to the current RSS
  const int64_t before = proc_status_bytes("VmRSS");
  const auto t0 = std::chrono::steady_clock::now();
  auto m = model::load_model(model_dir, lo);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t peak = proc_status_bytes("VmHWM");
  int64_t bytes = 0;
  nlohmann::json sums = nlohmann::json::object();
  for (const auto& p : m->named_parameters()) {
    bytes += static_cast<int64_t>(p.value().nbytes());
    sums[p.key()] = p.value().sum(at::kDouble).item<double>();
  }
  nlohmann::json j = {{"rss_before", before}, {"peak", peak}, {"weight_bytes", bytes},
                      {"seconds", seconds}, {"sums", sums}};
  std::cout << j.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftune model test driver"};
  std::string model_dir, ids_path, out, dtype, save_dir, device = "cpu";
  bool grad = false, checkpointing = false;
  auto* mem = app.add_subcommand("load-memory", "load a model and print its peak memory");
  mem->add_option("--model", model_dir)->required();
  mem->add_option("--dtype", dtype);
  app.add_option("--model", model_dir);
  app.add_option("--ids", ids_path);
  app.add_option("--out", out);
  app.add_option("--dtype", dtype);
  app.add_option("--save", save_dir, "re-save the loaded model here");
  app.add_flag("--grad", grad);
  app.add_flag("--checkpointing", checkpointing);
  app.add_option("--device", device, "cpu (default), cuda or cuda:N");
  CLI11_PARSE(app, argc, argv);
  try {
    using namespace ftune;
    if (mem->parsed()) return load_memory(model_dir, dtype);
    FTUNE_CHECK(!model_dir.empty(), "--model: required");
    model::LoadOptions lo;
    if (!dtype.empty()) lo.dtype = model::dtype_from_name(dtype, "--dtype");
    lo.device = model::parse_device(device, "--device");
    at::globalContext().setFloat32MatmulPrecision("highest");  // no TF32: fp32 parity on CUDA
    auto m = model::load_model(model_dir, lo);
    m->set_grad_checkpointing(checkpointing);
    if (!save_dir.empty()) model::save_model(save_dir, m, /*max_shard_bytes=*/200000);
    if (ids_path.empty()) return 0;
    auto j = nlohmann::json::parse(read_file(ids_path));
    std::vector<std::vector<int64_t>> rows = j.get<std::vector<std::vector<int64_t>>>();
    at::Tensor ids = at::empty({static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}, at::kLong);
    for (size_t i = 0; i < rows.size(); ++i) ids[i] = at::tensor(rows[i], at::kLong);
    ids = ids.to(lo.device);
    io::TensorList tensors;
    torch::AutoGradMode mode(grad);
    at::Tensor logits = m->forward(ids);
    tensors.emplace_back("logits", logits.detach().to(at::kFloat).cpu());
    if (grad) {
      auto loss = model::causal_lm_loss_sum(logits, ids);
      at::Tensor mean = loss.sum / static_cast<double>(loss.count);
      mean.backward();
      tensors.emplace_back("loss", mean.detach().reshape({1}).cpu());
      for (const auto& p : m->named_parameters()) {
        tensors.emplace_back("grad." + p.key(), p.value().grad().to(at::kFloat).cpu());
      }
    }
    io::save_safetensors(out, tensors);
  } catch (const std::exception& e) {
    std::cerr << "model_tool: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
