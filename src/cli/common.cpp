// Shared loading for eval/generate; see common.h.
#include "cli/common.h"

#include "core/error.h"

namespace ftune::cli {

at::Device parse_device(const std::string& s) {
  if (s == "cpu") return at::kCPU;
  if (s.rfind("cuda", 0) == 0) {
    FTUNE_CHECK(at::hasCUDA(), "--device: ", s, " requested but this ftune build or machine has no CUDA");
    return at::Device(s);
  }
  fail("--device: expected cpu, cuda or cuda:N, got \"", s, "\"");
}

InferenceModel load_inference_model(const std::string& dir, const std::string& dtype,
                                    const std::string& device) {
  model::LoadOptions opts;
  if (!dtype.empty()) opts.dtype = model::dtype_from_name(dtype, "--dtype");
  opts.device = parse_device(device);
  // Tokenizer first: it is cheap, and a missing tokenizer should not wait for a multi-GB load.
  tok::Tokenizer tok = tok::Tokenizer::load(dir);
  InferenceModel out{model::load_model(dir, opts), std::move(tok), opts.device};
  tok::check_fits_vocab(out.tokenizer, out.model->config().vocab_size, dir + "/config.json");
  out.model->eval();
  return out;
}

}  // namespace ftune::cli
