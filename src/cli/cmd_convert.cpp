// `ftune convert --gguf FILE --out DIR`: turns a llama.cpp GGUF file of a Llama model into a
// standard HF model dir (config.json, model.safetensors, generation_config.json, tokenizer.json,
// tokenizer_config.json with the chat template) that ftune and transformers both load.
// A new dir is written under a temporary name and renamed into place, so an interrupted convert
// never leaves a half-written model there. An existing dir (empty, or any with --force) gets each
// of those files replaced atomically and keeps every other file, the input GGUF included.
// The tokenizer is loaded back with ftune's own tokenizer before anything is written, so a
// vocabulary ftune cannot run fails here rather than at the first training step.
#include <algorithm>
#include <iostream>
#include <unistd.h>

#include "cli/commands.h"
#include "core/error.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/gguf_import.h"
#include "model/hf_io.h"
#include "tokenizer/tokenizer.h"

namespace ftune::cli {
namespace {
namespace fs = std::filesystem;

struct ConvertArgs {
  std::string gguf, out, dtype = "fp32";
  bool force = false;
};

// Refuses to run when a file convert writes (or removes, for the other weights layout) in `out`
// is the input itself: replacing it would lose the user's GGUF.
void check_input_survives(const fs::path& gguf, const fs::path& out) {
  const auto written = model::gguf_import_files();
  std::error_code ec;
  for (fs::directory_iterator it(out, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const bool ours = io::is_weights_file_name(name) ||
                      std::find(written.begin(), written.end(), name) != written.end();
    std::error_code eq;
    if (ours && fs::equivalent(it->path(), gguf, eq)) {
      fail(gguf.string(), ": --gguf: convert would replace this file with its ", name,
           "; move the GGUF file or choose another --out");
    }
  }
  FTUNE_CHECK(!ec, out.string(), ": --out: cannot list the directory: ", ec.message());
}

void run_convert(const ConvertArgs& a) {
  const at::ScalarType dtype = model::dtype_from_name(a.dtype, "--dtype");
  FTUNE_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "--dtype: expected fp32 or bf16, got \"", a.dtype, "\"");
  const fs::path out = a.out;
  FTUNE_CHECK(!out.empty(), "--out: expected a directory");
  std::error_code ec;
  const bool out_exists = fs::exists(out, ec);
  if (out_exists) {
    FTUNE_CHECK(fs::is_directory(out, ec), out.string(), ": --out: exists and is not a directory");
    const bool empty = fs::is_empty(out, ec);
    FTUNE_CHECK(!ec, out.string(), ": --out: cannot list the directory: ", ec.message());
    FTUNE_CHECK(a.force || empty, out.string(),
                ": --out: directory exists and is not empty (pass --force to replace the model "
                "files in it)");
  }
  FTUNE_CHECK(fs::is_regular_file(a.gguf, ec), a.gguf, ": --gguf: no such file");
  if (out_exists) check_input_survives(a.gguf, out);

  const io::GgufFile f(a.gguf);
  const model::GgufImport imp = model::import_gguf(f);
  // Self-check: ftune must be able to load and run the tokenizer it is about to write.
  tok::Tokenizer tok = tok::Tokenizer::from_json(imp.tokenizer_json, imp.tokenizer_config,
                                                 a.gguf + " (converted tokenizer)");
  FTUNE_CHECK(tok.vocab_size() <= imp.config.vocab_size, a.gguf, ": tokenizer has ",
              tok.vocab_size(), " tokens, more than the model's vocab_size ",
              imp.config.vocab_size);
  tok.encode("Hello, world! 123");
  if (!tok.chat_template().empty()) {
    try {
      tok.apply_chat_template(
          nlohmann::ordered_json::array({{{"role", "user"}, {"content", "Hi"}}}), true);
    } catch (const ftune::Error& e) {
      std::cerr << "ftune: warning: the chat template does not render with ftune: " << e.what()
                << "\n";
    }
  }

  if (out_exists) {
    model::write_gguf_import(f, imp, out, dtype);
  } else {
    fs::path tmp = out;
    tmp += ".tmp-" + std::to_string(::getpid());
    fs::remove_all(tmp, ec);
    try {
      model::write_gguf_import(f, imp, tmp, dtype);
      fs::rename(tmp, out, ec);
      FTUNE_CHECK(!ec, out.string(), ": --out: cannot rename ", tmp.string(), " into place: ",
                  ec.message());
    } catch (...) {
      fs::remove_all(tmp, ec);
      throw;
    }
  }
  const auto& c = imp.config;
  std::cout << "wrote " << out.string() << ": llama, " << c.num_hidden_layers << " layers, hidden "
            << c.hidden_size << ", " << c.num_attention_heads << " heads (" << c.num_key_value_heads
            << " kv), vocab " << c.vocab_size << ", " << c.num_parameters() << " parameters, "
            << model::dtype_name(dtype) << (c.tie_word_embeddings ? ", tied embeddings" : "")
            << "\n";
}

}  // namespace

void register_convert(CLI::App& app) {
  auto a = std::make_shared<ConvertArgs>();
  auto* cmd =
      app.add_subcommand("convert", "Convert a llama.cpp GGUF Llama model to an HF model dir");
  cmd->add_option("--gguf", a->gguf, "GGUF file (general.architecture \"llama\")")
      ->required()
      ->type_name("FILE");
  cmd->add_option("--out", a->out, "Output HF model directory")->required()->type_name("DIR");
  cmd->add_option("--dtype", a->dtype,
                  "Weight dtype of model.safetensors: fp32 (default, exact dequantized values) "
                  "or bf16");
  cmd->add_flag("--force", a->force, "Write into a non-empty --out, replacing only the files convert writes");
  cmd->callback([a] { run_convert(*a); });
}

}  // namespace ftune::cli
