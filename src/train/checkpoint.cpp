// Atomic, pruned training checkpoints; see checkpoint.h.
#include "train/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>

#include "core/crc32c.h"
#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"
#include "lora/adapter.h"
#include "model/hf_io.h"

namespace ftune::train {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// 2: the dir holds checksums.json. 1 (before checksums) still loads, unverified.
constexpr int kFormatVersion = 2;
const char kStateFile[] = "trainer_state.json";
const char kChecksumsFile[] = "checksums.json";

// step-<digits> -> N, anything else -> -1.
int64_t step_of(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() <= 5) return -1;
  int64_t n = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    n = n * 10 + (name[i] - '0');
  }
  return n;
}

// The step-<N> dirs in output_dir (only those with trainer_state.json when `complete_only`),
// sorted by step.
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& output_dir,
                                                           bool complete_only = true) {
  std::vector<std::pair<int64_t, fs::path>> out;
  const fs::path root = output_dir / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const int64_t n = step_of(e.path().filename().string());
    if (n >= 0 && fs::is_directory(e.path(), ec) &&
        (!complete_only || fs::exists(e.path() / kStateFile, ec))) {
      out.emplace_back(n, e.path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string hex8(uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof(buf), "%08x", v);
  return buf;
}

// checksums.json: every other file under `dir` (relative path) -> {size, crc32c}.
void write_checksums(const fs::path& dir) {
  json files = json::object();
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string rel = fs::relative(e.path(), dir).generic_string();
    if (!e.is_regular_file() || rel == kChecksumsFile) continue;
    const FileChecksum c = checksum_file(e.path());
    files[rel] = {{"size", c.size}, {"crc32c", hex8(c.crc32c)}};
  }
  std::string text = "{\"algorithm\": \"crc32c\", \"files\": {";  // one line per file
  for (const auto& [rel, e] : files.items()) {
    text += (text.back() == '{' ? "\n " : ",\n ") + json(rel).dump() + ": " + e.dump();
  }
  write_file_atomic(dir / kChecksumsFile, text + "\n}}\n");
}

// Checks each file checksums.json lists: present, its size, then its CRC-32C.
void verify_checksums(const fs::path& dir) {
  const std::string where = "checkpoint " + dir.string() + ": ";
  json j;
  try {
    j = json::parse(read_file(dir / kChecksumsFile));
  } catch (const json::parse_error& e) {
    fail(where, kChecksumsFile, ": not valid JSON: ", e.what());
  }
  FTUNE_CHECK(j.is_object() && j.value("algorithm", json()) == "crc32c" && j.contains("files") &&
                  j.at("files").is_object(),
              where, kChecksumsFile, ": expected {\"algorithm\": \"crc32c\", \"files\": {...}}");
  for (const auto& [rel, e] : j.at("files").items()) {
    FTUNE_CHECK(e.is_object() && e.contains("size") && e.at("size").is_number_unsigned() &&
                    e.contains("crc32c") && e.at("crc32c").is_string() &&
                    fs::path(rel).is_relative() && rel.find("..") == std::string::npos,
                where, kChecksumsFile, ": ", rel, ": expected {\"size\", \"crc32c\"}, got ", e.dump());
    const fs::path p = dir / rel;
    std::error_code ec;
    FTUNE_CHECK(fs::is_regular_file(p, ec), where, rel, ": missing (", kChecksumsFile,
                " lists it)");
    const int64_t want = e.at("size").get<int64_t>();
    const int64_t size = static_cast<int64_t>(fs::file_size(p, ec));
    FTUNE_CHECK(!ec && size == want, where, rel, ": expected ", want, " bytes (", kChecksumsFile,
                "), found ", ec ? ec.message() : std::to_string(size) + ": truncated or overwritten");
    const std::string crc = hex8(checksum_file(p).crc32c);
    FTUNE_CHECK(crc == e.at("crc32c").get<std::string>(), where, rel, ": expected CRC-32C ",
                e.at("crc32c").get<std::string>(), " (", kChecksumsFile, "), found ", crc,
                ": the file is corrupted");
  }
}

at::Device param_device(model::LlamaForCausalLM& m) {
  auto ps = m->parameters();
  return ps.empty() ? at::Device(at::kCPU) : ps[0].device();
}

}  // namespace

json TrainState::to_json() const {
  return json{{"step", step},
              {"epoch", epoch},
              {"position", position},
              {"tokens_seen", tokens_seen},
              {"elapsed_s", elapsed_s},
              {"last_loss", std::isfinite(last_loss) ? json(last_loss) : json(nullptr)},
              {"last_eval_loss", std::isfinite(last_eval_loss) ? json(last_eval_loss) : json(nullptr)},
              {"last_eval_step", last_eval_step >= 0 ? json(last_eval_step) : json(nullptr)}};
}

TrainState TrainState::from_json(const json& j, const std::string& origin) {
  FTUNE_CHECK(j.is_object(), origin, ": state: expected an object");
  TrainState s;
  // A count: an integer in [0, max]. A hand-edited or corrupted file must not start a run at
  // step -1 (lr -1e-3) or 2^62.
  auto get_count = [&](const char* key, int64_t max, bool required = true) -> int64_t {
    if (!required && (!j.contains(key) || j.at(key).is_null())) return -1;
    FTUNE_CHECK(j.contains(key), origin, ": state.", key, ": missing");
    const json& v = j.at(key);
    FTUNE_CHECK(v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() >
                                                                        static_cast<uint64_t>(max)),
                origin, ": state.", key, ": expected an integer in [0, ", max, "], got ", v.dump());
    const int64_t n = v.get<int64_t>();
    FTUNE_CHECK(n >= 0 && n <= max, origin, ": state.", key, ": expected an integer in [0, ", max,
                "], got ", n);
    return n;
  };
  // A number that is finite (or null/absent = NaN when `optional`), and >= 0 when `nonneg`.
  auto get_num = [&](const char* key, bool nonneg) {
    if (!j.contains(key) || j.at(key).is_null()) return std::numeric_limits<double>::quiet_NaN();
    const json& v = j.at(key);
    FTUNE_CHECK(v.is_number(), origin, ": state.", key, ": expected a number, got ", v.dump());
    const double x = v.get<double>();
    FTUNE_CHECK(std::isfinite(x) && (!nonneg || x >= 0), origin, ": state.", key, ": expected a ",
                nonneg ? "finite number >= 0" : "finite number", ", got ", v.dump());
    return x;
  };
  s.step = get_count("step", kMaxSteps);
  s.epoch = get_count("epoch", kMaxSteps);
  s.position = get_count("position", std::numeric_limits<int64_t>::max() / 2);
  s.tokens_seen = get_count("tokens_seen", std::numeric_limits<int64_t>::max() / 2);
  s.elapsed_s = get_num("elapsed_s", true);
  if (!std::isfinite(s.elapsed_s)) s.elapsed_s = 0;
  s.last_loss = get_num("last_loss", false);
  s.last_eval_loss = get_num("last_eval_loss", false);
  s.last_eval_step = get_count("last_eval_step", kMaxSteps, /*required=*/false);
  FTUNE_CHECK(s.last_eval_step <= s.step, origin, ": state.last_eval_step: ", s.last_eval_step,
              " is after state.step ", s.step);
  return s;
}

void save_trained(const fs::path& dir, model::LlamaForCausalLM& m, const std::string& base_model) {
  if (lora::has_lora(m)) {
    lora::save_adapter(dir, m, base_model);
  } else {
    model::save_model(dir, m);
  }
}

fs::path checkpoint_dir(const fs::path& output_dir, int64_t step) {
  return output_dir / "checkpoints" / ("step-" + std::to_string(step));
}

fs::path save_checkpoint(const fs::path& output_dir, model::LlamaForCausalLM& m,
                         const optim::AdamW& opt, const TrainState& state, int64_t keep_last,
                         const json& meta, const fs::path& tokenizer_dir,
                         const std::string& base_model, const optim::NamedTensors* optimizer_state) {
  const fs::path tmp = output_dir / "checkpoints" /
                      (".tmp-step-" + std::to_string(state.step) + "-" + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);
  try {
    save_trained(tmp, m, base_model);
    io::save_safetensors(tmp / "optimizer.safetensors",
                         optimizer_state != nullptr ? *optimizer_state : opt.state());

    if (!tokenizer_dir.empty()) model::copy_tokenizer_files(tokenizer_dir, tmp);
    crash_point("checkpoint:after_weights");  // test seam: a kill in the middle of the write

    write_rng_state(tmp / kRngFile, param_device(m));
    return finish_checkpoint(tmp, output_dir, state, keep_last, meta);
  } catch (...) {
    fs::remove_all(tmp, ec);  // a full disk gets back what the failed write took
    throw;
  }
}

void write_rng_state(const fs::path& file, at::Device device) {
  io::TensorList rng;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng.emplace_back("cpu", gen.get_state());
  }
  if (device.is_cuda()) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng.emplace_back("cuda", gen.get_state());
  }
  io::save_safetensors(file, rng);
}

fs::path finish_checkpoint(const fs::path& tmp, const fs::path& output_dir, const TrainState& state,
                           int64_t keep_last, const json& meta) {
  const fs::path root = output_dir / "checkpoints";
  const fs::path final_dir = checkpoint_dir(output_dir, state.step);
  json j = meta;
  j["format_version"] = kFormatVersion;
  j["state"] = state.to_json();
  write_file_atomic(tmp / kStateFile, j.dump(2) + "\n");
  write_checksums(tmp);  // last: covers every other file

  replace_dir_atomic(tmp, final_dir);

  // Prune only now that the new checkpoint is in place; move each aside first so a kill during
  // removal never leaves a half-deleted dir that still looks complete.
  std::error_code ec;
  auto all = list_checkpoints(output_dir);
  const int64_t excess = static_cast<int64_t>(all.size()) - keep_last;
  for (int64_t i = 0; i < excess; ++i) {
    const fs::path& old = all[i].second;
    if (fs::equivalent(old, final_dir, ec)) continue;
    fs::path doomed = root / (".tmp-delete-" + old.filename().string());
    fs::rename(old, doomed, ec);
    fs::remove_all(ec ? old : doomed, ec);
  }
  return final_dir;
}

std::vector<fs::path> checkpoint_dirs(const fs::path& output_dir) {
  std::vector<fs::path> out;
  for (auto& [step, dir] : list_checkpoints(output_dir, /*complete_only=*/false)) {
    out.insert(out.begin(), dir);
  }
  return out;
}

std::optional<fs::path> latest_checkpoint(const fs::path& output_dir) {
  auto all = list_checkpoints(output_dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

void remove_stale_checkpoint_temps(const fs::path& output_dir) {
  const fs::path root = output_dir / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return;
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (e.path().filename().string().rfind(".tmp-", 0) == 0) doomed.push_back(e.path());
  }
  for (const auto& p : doomed) fs::remove_all(p, ec);
}

CheckpointInfo read_checkpoint_info(const fs::path& dir) {
  CheckpointInfo info;
  info.state_file = dir / kStateFile;
  const std::string origin = info.state_file.string();
  FTUNE_CHECK(fs::is_regular_file(info.state_file), dir.string(),
              ": not a complete checkpoint (no ", kStateFile, ")");
  json j;
  try {
    j = json::parse(read_file(info.state_file));
  } catch (const json::parse_error& e) {
    fail(origin, ": not valid JSON: ", e.what());
  }
  FTUNE_CHECK(j.is_object() && j.contains("state"), origin, ": state: missing");
  const json version = j.value("format_version", json());
  FTUNE_CHECK(version == 1 || version == kFormatVersion, origin, ": format_version: expected 1 or ",
              kFormatVersion, ", got ", version.dump());
  info.has_checksums = version == kFormatVersion;
  info.state = TrainState::from_json(j.at("state"), origin);
  j.erase("state");
  j.erase("format_version");
  if (j.contains("total_steps")) {
    const json& t = j.at("total_steps");
    FTUNE_CHECK(t.is_number_integer() && t.get<int64_t>() >= info.state.step, origin,
                ": total_steps: expected an integer >= state.step ", info.state.step, ", got ",
                t.dump());
  }
  FTUNE_CHECK(!j.contains("config") || j.at("config").is_string(), origin,
              ": config: expected the resolved config as a YAML string");
  info.meta = std::move(j);
  return info;
}

CheckpointInfo verify_checkpoint(const fs::path& dir) {
  std::error_code ec;
  const bool listed = fs::exists(dir / kChecksumsFile, ec);
  if (listed) verify_checksums(dir);
  CheckpointInfo info = read_checkpoint_info(dir);
  FTUNE_CHECK(listed || !info.has_checksums, "checkpoint ", dir.string(), ": ", kChecksumsFile,
              ": missing (", kStateFile, " says format_version ", kFormatVersion,
              ", which has one)");
  return info;
}

TrainState load_checkpoint(const fs::path& dir, model::LlamaForCausalLM& m, optim::AdamW& opt,
                           const OptimizerStateLoader& load_optimizer) {
  const TrainState state = read_checkpoint_info(dir).state;
  if (lora::has_lora(m)) {
    lora::load_adapter_weights(dir, m);
  } else {
    auto weights = io::load_weights(dir);
    torch::NoGradGuard no_grad;
    model::load_weights_into(m, weights, dir.string());
  }
  {
    const fs::path p = dir / "optimizer.safetensors";
    FTUNE_CHECK(fs::exists(p), p.string(), ": missing");
    io::SafetensorsReader reader(p);
    std::map<std::string, at::Tensor> st;
    for (const auto& name : reader.names()) st[name] = reader.tensor(name);
    if (load_optimizer) {
      load_optimizer(st, p.string());
    } else {
      opt.load_state(st, p.string());
    }
  }
  restore_rng_state(dir / kRngFile, param_device(m));
  return state;
}

void restore_rng_state(const fs::path& file, at::Device device) {
  FTUNE_CHECK(fs::exists(file), file.string(), ": missing");
  io::SafetensorsReader reader(file);
  FTUNE_CHECK(reader.contains("cpu"), file.string(), ": cpu: missing RNG state");
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(reader.tensor("cpu").clone());
  }
  if (device.is_cuda() && reader.contains("cuda")) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(reader.tensor("cuda").clone());
  }
}

}  // namespace ftune::train
