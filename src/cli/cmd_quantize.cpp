// `ftune quantize --model DIR --out DIR`: writes the model with its decoder-layer linear weights in
// NF4, in bitsandbytes' serialized layout (weight, weight.absmax, weight.quant_map,
// weight.nested_absmax, weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4) with
// transformers' quantization_config in config.json, plus the tokenizer files, so ftune and
// transformers+bitsandbytes both load it. Quantizes while loading (one weight at a time), and
// writes through a temporary dir renamed into place (common.h write_model_dir).
#include <cstdio>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/hf_io.h"
#include "quant/nf4.h"

namespace ftune::cli {
namespace {

struct QuantizeArgs {
  std::string model, out, dtype, compute_dtype = "bf16";
  int64_t blocksize = 64;
  bool no_double_quant = false, force = false;
};

void run_quantize(const QuantizeArgs& a) {
  require_model_dir(a.model, "--model");
  quant::QuantOptions q;
  q.blocksize = a.blocksize;
  q.double_quant = !a.no_double_quant;
  q.compute_dtype = model::dtype_from_name(a.compute_dtype, "quantize: --compute-dtype");
  FTUNE_CHECK(a.blocksize >= 64 && a.blocksize <= 4096 && (a.blocksize & (a.blocksize - 1)) == 0,
              "quantize: --blocksize: ", a.blocksize,
              " is not supported: expected 64, 128, 256, 512, 1024, 2048 or 4096");
  quant::validate(q, "quant");
  model::LoadOptions lo;
  lo.quant = q;
  if (!a.dtype.empty()) lo.dtype = model::dtype_from_name(a.dtype, "quantize: --dtype");
  auto m = model::load_model(a.model, lo);
  write_model_dir(a.out, "--out", a.force, [&](const std::filesystem::path& dir) {
    model::save_model(dir, m);
    model::copy_tokenizer_files(a.model, dir);
  });
  const model::BaseBytes b = model::base_bytes(m);
  std::printf("wrote %s: %lld linear parameters in NF4 (%.3f bits/param), %.1f MB in all\n",
              a.out.c_str(), static_cast<long long>(b.nf4_params), b.nf4_bits_per_param(),
              static_cast<double>(b.total_bytes()) / 1e6);
}

}  // namespace

void register_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  auto* cmd = app.add_subcommand(
      "quantize", "Write a model with 4-bit NF4 linear weights in bitsandbytes' layout");
  cmd->add_option("--model", a->model, "HF model directory to quantize")->required()->type_name("DIR");
  cmd->add_option("--out", a->out, "Output model directory: new or empty, or any with --force")
      ->required()
      ->type_name("DIR");
  cmd->add_option("--blocksize", a->blocksize,
                  "Elements per absmax: 64 (default, as bitsandbytes), 128, ..., 4096")
      ->type_name("INT");
  cmd->add_flag("--no-double-quant", a->no_double_quant,
                "Keep the absmax in fp32 (4.5 bits/param) instead of 8-bit (4.127 bits/param)");
  cmd->add_option("--dtype", a->dtype,
                  "dtype the weights are read in before quantizing, and of the embeddings, norms "
                  "and lm_head: fp32 or bf16 (default: the config's)");
  cmd->add_option("--compute-dtype", a->compute_dtype,
                  "bnb_4bit_compute_dtype written to config.json: bf16 (default) or fp32");
  cmd->add_flag("--force", a->force,
                "Write into a non-empty --out, replacing only its model files");
  cmd->callback([a] { run_quantize(*a); });
}

}  // namespace ftune::cli
