// Helpers shared by the inference subcommands: option parsing for --dtype/--device and loading a
// model dir together with its tokenizer.
#pragma once

#include <string>

#include "model/hf_io.h"
#include "tokenizer/tokenizer.h"

namespace ftune::cli {

at::Device parse_device(const std::string& s);  // "cpu", "cuda", "cuda:N"

struct InferenceModel {
  model::LlamaForCausalLM model{nullptr};
  tok::Tokenizer tokenizer;
  at::Device device = at::kCPU;  // where the weights live; inputs go there
};

// Loads `dir` (weights in `dtype`, "" = config's torch_dtype) plus its tokenizer, in eval mode.
InferenceModel load_inference_model(const std::string& dir, const std::string& dtype,
                                    const std::string& device);

}  // namespace ftune::cli
