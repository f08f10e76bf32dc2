// Helpers every subcommand shares: numeric flag validators, checks of input paths that name the
// path and the flag, the output-dir rule of the model writers, and loading a model dir together
// with its tokenizer. Every failure throws ftune::Error as "<path or subcommand>: <flag>: <what
// was expected>", so main() prints one line whatever went wrong.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "lora/adapter.h"
#include "model/hf_io.h"
#include "tokenizer/tokenizer.h"

namespace ftune::memory {
struct ModelRef;
}

namespace ftune::cli {

// CLI11 validators. They parse the text themselves, so "abc", "1.5" and "0" for an integer flag
// all end in the same "expected ..." message; CLI11 prefixes the flag and main() the subcommand.
CLI::Validator int_at_least(int64_t min);  // a plain decimal integer >= min
CLI::Validator finite_above_zero();        // a finite number > 0 (rejects inf, nan)
CLI::Validator in_zero_one();              // a number in (0, 1]

// `path` must be an existing regular file; `what` says what it should hold ("a UTF-8 text file").
void require_file(const std::string& path, const std::string& flag, const std::string& what);
// `dir` must be a directory holding config.json (an HF model dir).
void require_model_dir(const std::string& dir, const std::string& flag);
// `dir` must be a directory holding adapter_config.json; returns it parsed and checked.
lora::AdapterConfig require_adapter_dir(const std::string& dir, const std::string& flag);
// `dir` must be a directory holding tokenizer.json or tokenizer.model.
void require_tokenizer_dir(const std::string& dir, const std::string& flag);
// `text` must be valid UTF-8; the error names `where`, `flag` and the first bad byte offset.
void require_utf8(const std::string& text, const std::string& where, const std::string& flag);
// require_file + parse + LlamaConfig::from_json, for --config flags naming an HF config.json.
model::LlamaConfig read_config_file(const std::string& path, const std::string& flag);
// require_file + read + require_utf8.
std::string read_text_file(const std::string& path, const std::string& flag);

// Writes a model dir at `out` the way every model writer must: `out` may be missing or an empty
// directory; a non-empty one needs `force`, and then only the model files (config, weights,
// generation config, tokenizer files) are replaced and every other file in it is left alone.
// `write(tmp)` fills a fresh sibling directory, which is moved into place only once complete.
// The checks of write_model_dir on `out` alone, for commands that can fail them before a long
// load.
void check_model_out_dir(const std::string& out, const std::string& flag, bool force);
void write_model_dir(const std::string& out, const std::string& flag, bool force,
                     const std::function<void(const std::filesystem::path&)>& write);

struct InferenceModel {
  model::LlamaForCausalLM model{nullptr};
  tok::Tokenizer tokenizer;
  at::Device device = at::kCPU;  // where the weights live; inputs go there
};

// Loads `dir` (weights in `dtype`, "" = config's torch_dtype) plus its tokenizer, in eval mode.
// `cmd` is the subcommand, used to name the --dtype/--device flags in errors. A non-empty
// `adapter` is a PEFT adapter dir injected into the model unmerged (lora::load_adapter); its
// adapter_config.json is checked before the base model loads.
InferenceModel load_inference_model(const std::string& cmd, const std::string& dir,
                                    const std::string& dtype, const std::string& device,
                                    const std::string& adapter = "");

// The model presets' names, comma-separated (for --model's help and errors).
std::string preset_list();
// `ftune memory` / `ftune plan`'s --model: a preset name, an HF model dir or a config.json; `out`
// records which. Throws "<cmd>: --model: ..." for anything else.
model::LlamaConfig resolve_model(const std::string& ref, const std::string& cmd,
                                 memory::ModelRef* out);

// Adds the --adapter DIR option (a PEFT LoRA adapter dir, applied unmerged) to `cmd`.
void add_adapter_option(CLI::App* cmd, std::string& adapter);

}  // namespace ftune::cli
