// Shared flag validation, path checks, model-dir writing and loading; see common.h.
#include "cli/common.h"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <regex>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "lora/adapter.h"
#include "memory/report.h"
#include "model/device.h"
#include "tokenizer/unicode.h"
#include "train/checkpoint_sharded.h"

namespace ftune::cli {
namespace fs = std::filesystem;

namespace {

std::optional<int64_t> parse_int(const std::string& s) {
  int64_t v = 0;
  const char* last = s.data() + s.size();
  auto [end, ec] = std::from_chars(s.data(), last, v);
  if (s.empty() || ec != std::errc() || end != last) return std::nullopt;
  return v;
}

std::optional<double> parse_double(const std::string& s) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return v;
}

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

// The files a model writer owns in a model dir; --force replaces exactly these.
bool is_model_file(const std::string& name) {
  static const std::set<std::string> kNames = {
      "config.json",           "generation_config.json", "model.safetensors",
      "model.safetensors.index.json", "tokenizer.json",  "tokenizer.model",
      "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"};
  static const std::regex kShard(R"(model-\d+-of-\d+\.safetensors)");
  return kNames.count(name) > 0 || std::regex_match(name, kShard);
}

}  // namespace

CLI::Validator int_at_least(int64_t min) {
  return CLI::Validator(
      [min](std::string& s) -> std::string {
        const auto v = parse_int(s);
        if (v && *v >= min) return "";
        return "expected an integer >= " + std::to_string(min) + ", got " + in_quotes(s);
      },
      "");
}

CLI::Validator finite_above_zero() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        const auto v = parse_double(s);
        if (v && std::isfinite(*v) && *v > 0) return "";
        return "expected a finite number > 0, got " + in_quotes(s);
      },
      "");
}

CLI::Validator in_zero_one() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        const auto v = parse_double(s);
        if (v && *v > 0 && *v <= 1) return "";  // false for nan
        return "expected a number in (0, 1], got " + in_quotes(s);
      },
      "");
}

void require_file(const std::string& path, const std::string& flag, const std::string& what) {
  std::error_code ec;
  const auto st = fs::status(path, ec);
  FTUNE_CHECK(fs::exists(st), path, ": ", flag, ": no such file (expected ", what, ")");
  FTUNE_CHECK(!fs::is_directory(st), path, ": ", flag, ": is a directory (expected ", what, ")");
  FTUNE_CHECK(fs::is_regular_file(st), path, ": ", flag, ": not a regular file (expected ", what,
              ")");
}

namespace {
// `dir` must be a directory holding at least one of `any_of`, listed in `names` for the message.
void require_dir_with(const std::string& dir, const std::string& flag,
                      std::initializer_list<const char*> any_of, const std::string& names,
                      const std::string& kind = "an HF model dir") {
  const std::string what = kind + " with " + names;
  std::error_code ec;
  const auto st = fs::status(dir, ec);
  FTUNE_CHECK(fs::exists(st), dir, ": ", flag, ": no such directory (expected ", what, ")");
  FTUNE_CHECK(fs::is_directory(st), dir, ": ", flag, ": not a directory (expected ", what, ")");
  for (const char* f : any_of) {
    if (fs::exists(fs::path(dir) / f)) return;
  }
  FTUNE_CHECK(!train::is_sharded_checkpoint(dir), dir, ": ", flag, ": a sharded training "
              "checkpoint (shards/index.json), not ", kind, ": it only resumes training "
              "(training.resume); use the run's final/ dir, which the run writes when it finishes");
  fail(dir, ": ", flag, ": no ", names, " (expected ", kind, ")");
}
}  // namespace

void require_model_dir(const std::string& dir, const std::string& flag) {
  require_dir_with(dir, flag, {"config.json"}, "config.json");
}

lora::AdapterConfig require_adapter_dir(const std::string& dir, const std::string& flag) {
  require_dir_with(dir, flag, {lora::kAdapterConfigFile}, lora::kAdapterConfigFile,
                   "a PEFT adapter dir");
  return lora::read_adapter_config(dir);
}

void require_tokenizer_dir(const std::string& dir, const std::string& flag) {
  require_dir_with(dir, flag, {"tokenizer.json", "tokenizer.model"},
                   "tokenizer.json or tokenizer.model");
}

void require_utf8(const std::string& text, const std::string& where, const std::string& flag) {
  if (const auto bad = tok::utf8_invalid_at(text)) {
    fail(where, ": ", flag, ": not valid UTF-8 (first bad byte at offset ", *bad, ")");
  }
}

model::LlamaConfig read_config_file(const std::string& path, const std::string& flag) {
  require_file(path, flag, "an HF config.json");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::parse_error& e) {
    fail(path, ": ", flag, ": not valid JSON: ", e.what());
  }
  return model::LlamaConfig::from_json(j, path);
}

std::string read_text_file(const std::string& path, const std::string& flag) {
  require_file(path, flag, "a UTF-8 text file");
  std::string text = read_file(path);
  require_utf8(text, path, flag);
  return text;
}

void check_model_out_dir(const std::string& out_str, const std::string& flag, bool force) {
  FTUNE_CHECK(!out_str.empty(), flag, ": expected a directory, got \"\"");
  std::error_code ec;
  const auto st = fs::status(out_str, ec);
  if (!fs::exists(st)) return;
  FTUNE_CHECK(fs::is_directory(st), out_str, ": ", flag,
              ": exists and is not a directory (expected a new or empty directory)");
  FTUNE_CHECK(force || fs::is_empty(out_str, ec), out_str, ": ", flag,
              ": directory exists and is not empty (pass --force to replace the model files "
              "in it)");
}

void write_model_dir(const std::string& out_str, const std::string& flag, bool force,
                     const std::function<void(const fs::path&)>& write) {
  check_model_out_dir(out_str, flag, force);
  const fs::path out = out_str;
  std::error_code ec;
  const bool existed = fs::exists(fs::status(out, ec));
  if (!existed && out.has_parent_path()) {
    fs::create_directories(out.parent_path(), ec);
    FTUNE_CHECK(!ec, out_str, ": ", flag, ": cannot create the parent directory: ", ec.message());
  }
  // A sibling of `out`, so the final renames stay on one filesystem.
  fs::path tmp = fs::absolute(out).lexically_normal();  // "." must not put it inside `out`
  if (!tmp.has_filename()) tmp = tmp.parent_path();
  tmp += ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  FTUNE_CHECK(!ec, out_str, ": ", flag, ": cannot create ", tmp.string(), ": ", ec.message());
  try {
    write(tmp);
    if (!existed || fs::is_empty(out)) {
      // rename(2) replaces an empty directory in one step.
      fs::rename(tmp, out, ec);
      FTUNE_CHECK(!ec, out_str, ": ", flag, ": cannot move the new model into place: ",
                  ec.message());
      return;
    }
    std::set<std::string> written;
    for (const auto& e : fs::directory_iterator(tmp)) written.insert(e.path().filename().string());
    // Stale model files of the old model (another shard count, a tokenizer.model next to a new
    // tokenizer.json) would be picked up with the new ones, so they go too; nothing else does.
    for (const auto& e : fs::directory_iterator(out)) {
      const std::string name = e.path().filename().string();
      if (is_model_file(name) && !written.count(name) && !e.is_directory()) {
        fs::remove(e.path(), ec);
        FTUNE_CHECK(!ec, e.path().string(), ": ", flag, ": cannot remove: ", ec.message());
      }
    }
    for (const auto& name : written) {
      fs::rename(tmp / name, out / name, ec);
      FTUNE_CHECK(!ec, (out / name).string(), ": ", flag, ": cannot replace: ", ec.message());
    }
    fs::remove_all(tmp, ec);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

InferenceModel load_inference_model(const std::string& cmd, const std::string& dir,
                                    const std::string& dtype, const std::string& device,
                                    const std::string& adapter) {
  require_model_dir(dir, "--model");
  if (!adapter.empty()) require_adapter_dir(adapter, "--adapter");
  model::LoadOptions opts;
  if (!dtype.empty()) opts.dtype = model::dtype_from_name(dtype, cmd + ": --dtype");
  opts.device = model::parse_device(device, cmd + ": --device");
  // Tokenizer first: it is cheap, and a missing tokenizer should not wait for a multi-GB load.
  tok::Tokenizer tok = tok::Tokenizer::load(dir);
  tok::check_fits_vocab(tok, model::load_config(dir).vocab_size, dir + "/config.json");
  InferenceModel out{model::load_model(dir, opts), std::move(tok), opts.device};
  if (!adapter.empty()) lora::load_adapter(adapter, out.model);
  out.model->eval();
  return out;
}

void add_adapter_option(CLI::App* cmd, std::string& adapter) {
  cmd->add_option("--adapter", adapter,
                  "PEFT LoRA adapter dir (adapter_config.json, adapter_model.safetensors) to "
                  "apply, unmerged, on top of --model")
      ->type_name("DIR");
}

std::string preset_list() {
  std::string names;
  for (const auto& n : model::preset_names()) names += (names.empty() ? "" : ", ") + n;
  return names;
}

model::LlamaConfig resolve_model(const std::string& ref, const std::string& cmd,
                                 memory::ModelRef* out) {
  std::error_code ec;
  out->name = ref;
  if (fs::exists(ref, ec)) {
    if (fs::is_directory(ref, ec)) {
      require_model_dir(ref, "--model");
      return read_config_file((fs::path(ref) / "config.json").string(), "--model");
    }
    return read_config_file(ref, "--model");
  }
  try {
    out->preset = true;
    return model::preset_config(ref);
  } catch (const Error&) {
    fail(cmd, ": --model: \"", ref, "\" is neither a preset (", preset_list(),
         ") nor an existing model dir or config.json");
  }
}

}  // namespace ftune::cli
