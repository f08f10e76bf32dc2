// Test driver for tests/python/test_quant.py (bitsandbytes and transformers are the oracles):
//   quant_tool quantize-file --in A.safetensors --out B.safetensors [--blocksize N] [--no-double-quant]
//                            [--device cuda]
//     quantizes every tensor of A; B holds each one's bitsandbytes keys (NAME, NAME.absmax, ...)
//     and NAME.dequant (dequantize_nf4 into the tensor's own dtype). With --device cuda also
//     NAME.dequant_dev (the same NF4 tensor dequantized there: the CUDA kernel) and the keys of
//     quantizing there, under dev.NAME (tests/python/test_gpu.py; --device cpu gives the same
//     keys from the CPU, for a dry run of that test).
//   quant_tool load --model DIR [--quant] [--dtype D] [--compute-dtype D] [--ids 1,2,3 --out F]
//     loads DIR (4-bit with --quant, or as stored) and prints one JSON line: RSS before the load,
//     peak RSS (VmHWM reset before the load), base_bytes(); with --ids writes the logits to F.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>
#include <sstream>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/device.h"
#include "model/hf_io.h"
#include "quant/nf4.h"

namespace {
using namespace ftune;

int64_t proc_status_bytes(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1)) * 1024;
  }
  return -1;
}

int quantize_file(const std::string& in, const std::string& out, int64_t blocksize, bool no_dq,
                  const std::string& device_name) {
  const bool on_device = !device_name.empty();
  const at::Device device = model::parse_device(on_device ? device_name : "cpu", "--device");
  io::SafetensorsReader r(in);
  quant::QuantOptions o;
  o.blocksize = blocksize;
  o.double_quant = !no_dq;
  io::TensorList tensors;
  for (const std::string& name : r.names()) {
    at::Tensor w = r.tensor(name);
    quant::Nf4Tensor t = quant::quantize_nf4(w, o);
    for (auto& kv : quant::to_bnb_tensors(t, name)) tensors.push_back(kv);
    tensors.emplace_back(name + ".dequant", quant::dequantize_nf4(t, w.scalar_type()));
    if (on_device) {
      tensors.emplace_back(name + ".dequant_dev",
                           quant::dequantize_nf4(t.to(device), w.scalar_type()).cpu());
      quant::Nf4Tensor on_dev = quant::quantize_nf4(w.to(device), o);
      for (auto& kv : quant::to_bnb_tensors(on_dev.to(at::kCPU), "dev." + name)) {
        tensors.push_back(kv);
      }
    }
  }
  io::save_safetensors(out, tensors);
  return 0;
}

int load(const std::string& dir, bool quant, const std::string& dtype, const std::string& compute,
         const std::string& ids, const std::string& out) {
  model::LoadOptions lo;
  if (!dtype.empty()) lo.dtype = model::dtype_from_name(dtype, "--dtype");
  if (quant) {
    lo.quant = quant::QuantOptions();
    if (!compute.empty()) lo.quant->compute_dtype = model::dtype_from_name(compute, "--compute-dtype");
  }
  at::ones({8}).sum();  // initialize ATen's CPU backend before the baseline
  std::ofstream("/proc/self/clear_refs") << "5";  // reset VmHWM to the current RSS
  const int64_t before = proc_status_bytes("VmRSS");
  auto m = model::load_model(dir, lo);
  const int64_t peak = proc_status_bytes("VmHWM");
  const model::BaseBytes b = model::base_bytes(m);
  nlohmann::json j = {{"rss_before", before}, {"peak", peak}, {"nf4_params", b.nf4_params},
                      {"nf4_bytes", b.nf4_bytes}, {"dense_params", b.dense_params},
                      {"dense_bytes", b.dense_bytes}, {"bits_per_param", b.nf4_bits_per_param()}};
  std::cout << j.dump() << "\n";
  if (!ids.empty()) {
    std::vector<int64_t> v;
    std::stringstream ss(ids);
    for (std::string tok; std::getline(ss, tok, ',');) v.push_back(std::stoll(tok));
    torch::NoGradGuard no_grad;
    m->eval();
    at::Tensor logits = m->forward(at::tensor(v, at::kLong).view({1, -1}));
    io::save_safetensors(out, {{"logits", logits.to(at::kFloat).contiguous()}});
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftune NF4 test driver"};
  std::string in, out, model_dir, dtype, compute, ids, device;
  int64_t blocksize = 64;
  bool no_dq = false, quant = false;
  auto* qf = app.add_subcommand("quantize-file", "quantize every tensor of a safetensors file");
  qf->add_option("--in", in)->required();
  qf->add_option("--out", out)->required();
  qf->add_option("--blocksize", blocksize);
  qf->add_flag("--no-double-quant", no_dq);
  qf->add_option("--device", device, "also dequantize and quantize on this device (cuda)");
  auto* ld = app.add_subcommand("load", "load a model, print memory, optionally logits");
  ld->add_option("--model", model_dir)->required();
  ld->add_flag("--quant", quant);
  ld->add_option("--dtype", dtype);
  ld->add_option("--compute-dtype", compute);
  ld->add_option("--ids", ids);
  ld->add_option("--out", out);
  app.require_subcommand(1);
  CLI11_PARSE(app, argc, argv);
  try {
    if (qf->parsed()) return quantize_file(in, out, blocksize, no_dq, device);
    return load(model_dir, quant, dtype, compute, ids, out);
  } catch (const std::exception& e) {
    std::cerr << "quant_tool: error: " << e.what() << "\n";
    return 1;
  }
}
