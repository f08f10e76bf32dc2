// Parsing, validation and printing of the `ftune train` config; see train_config.h.
#include "config/train_config.h"

#include <cmath>
#include <set>

#include "core/error.h"

namespace ftune::config {
namespace {

const char* const kSections[] = {"model", "data", "training", "logging", "parallel", "lora",
                                 "quant"};

TrainConfig parse_root(const YAML::Node& root, const std::string& file, Origins origins) {
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string name = it->first.IsScalar() ? it->first.Scalar() : "?";
    bool known = false;
    for (const char* s : kSections) known = known || name == s;
    if (known) continue;
    const YAML::Mark m = it->first.Mark();
    std::string where = m.is_null() || m.line < 0 ? file : file + ":" + std::to_string(m.line + 1);
    fail(where, ": ", name, ": unknown section (expected model, data, training, logging, "
         "parallel, lora, quant)");
  }
  TrainConfig c;
  c.file = file;
  c.origins = std::move(origins);
  read_section(root, "model", file, c.origins, c.model);
  read_section(root, "data", file, c.origins, c.data);
  read_section(root, "training", file, c.origins, c.training);
  read_section(root, "logging", file, c.origins, c.logging);
  read_section(root, "parallel", file, c.origins, c.parallel);
  // An optional section is on when present, even empty (`lora:` or `lora: {}`: all defaults).
  auto optional_section = [&](const char* name, auto& out) {
    const YAML::Node& r = root;  // const lookup: never inserts the section
    const YAML::Node n = r[name];
    if (!n.IsDefined()) return;
    for (auto it = root.begin(); it != root.end() && !c.origins.count(name); ++it) {
      const YAML::Mark m = it->first.Mark();  // the line of the section's name
      if (it->first.IsScalar() && it->first.Scalar() == name && !m.is_null() && m.line >= 0) {
        c.origins[name] = file + ":" + std::to_string(m.line + 1);
      }
    }
    out.emplace();
    read_section(root, name, file, c.origins, *out);
  };
  optional_section("lora", c.lora);
  optional_section("quant", c.quant);
  return c;
}

}  // namespace

TrainConfig load_train_config(const std::filesystem::path& file,
                              const std::vector<std::string>& overrides) {
  // A missing file is reported by load_yaml_file; a directory or device (/dev/null) is not a
  // config, whatever it reads as.
  std::error_code ec;
  const auto st = std::filesystem::status(file, ec);
  FTUNE_CHECK(!std::filesystem::is_directory(st), file.string(),
              ": --config: is a directory (expected a YAML config file)");
  FTUNE_CHECK(!std::filesystem::exists(st) || std::filesystem::is_regular_file(st), file.string(),
              ": --config: not a regular file (expected a YAML config file)");
  YAML::Node root = load_yaml_file(file);
  Origins origins;
  for (const auto& o : overrides) apply_override(root, o, origins);
  return parse_root(root, file.string(), std::move(origins));
}

TrainConfig parse_train_config(const std::string& yaml, const std::string& origin,
                               const std::vector<std::string>& overrides) {
  YAML::Node root = parse_yaml_text(yaml, origin);
  Origins origins;
  for (const auto& o : overrides) apply_override(root, o, origins);
  return parse_root(root, origin, std::move(origins));
}

std::string TrainConfig::where(const std::string& key) const {
  auto it = origins.find(key);
  if (it != origins.end()) return it->second;
  return file.empty() ? std::string("config") : file;
}

void TrainConfig::validate() const {
  // check(key, ok, what): "<where key was set>: key: what".
  auto check = [&](const char* key, bool ok, const auto&... what) {
    if (!ok) fail(where(key), ": ", key, ": ", what...);
  };
  auto one_of = [&](const char* key, const std::string& v, std::initializer_list<const char*> vals) {
    std::string list;
    for (const char* s : vals) {
      if (v == s) return;
      list += (list.empty() ? "" : ", ") + std::string(s);
    }
    fail(where(key), ": ", key, ": expected one of ", list, ", got \"", v, "\"");
  };

  check("model.path", !model.path.empty(), "required (an HF model dir or preset:NAME)");
  one_of("model.dtype", model.dtype, {"fp32", "bf16"});
  check("model.device",
        model.device == "cpu" || model.device == "cuda" || model.device.rfind("cuda:", 0) == 0,
        "expected cpu, cuda or cuda:N, got \"", model.device, "\"");

  check("data.train", !data.train.empty(), "required (a JSONL file)");
  one_of("data.format", data.format, {"text", "alpaca", "chat"});
  check("data.seq_len", data.seq_len >= 2, "expected at least 2, got ", data.seq_len);
  check("data.valid_fraction", data.valid_fraction >= 0.0 && data.valid_fraction < 1.0,
        "expected a value in [0, 1), got ", data.valid_fraction);
  check("data.valid_fraction", data.valid.empty() || data.valid_fraction == 0.0,
        "give either data.valid or data.valid_fraction, not both");

  const auto& t = training;
  check("training.steps", (t.steps > 0) != (t.epochs > 0.0),
        "give exactly one of training.steps and training.epochs (a positive number)");
  check("training.steps", t.steps >= 0, "expected at least 0, got ", t.steps);
  check("training.epochs", t.epochs >= 0.0 && std::isfinite(t.epochs),
        "expected a positive number, got ", t.epochs);
  check("training.micro_batch", t.micro_batch >= 1, "expected at least 1, got ", t.micro_batch);
  check("training.grad_accum", t.grad_accum >= 1, "expected at least 1, got ", t.grad_accum);
  check("training.lr", t.lr >= 0.0 && std::isfinite(t.lr), "expected a number >= 0, got ", t.lr);
  one_of("training.lr_schedule", t.lr_schedule, {"cosine", "linear", "constant"});
  check("training.warmup_steps", t.warmup_steps >= 0, "expected at least 0, got ", t.warmup_steps);
  check("training.weight_decay", t.weight_decay >= 0.0, "expected at least 0, got ", t.weight_decay);
  check("training.adam_beta1", t.adam_beta1 >= 0.0 && t.adam_beta1 < 1.0,
        "expected a value in [0, 1), got ", t.adam_beta1);
  check("training.adam_beta2", t.adam_beta2 >= 0.0 && t.adam_beta2 < 1.0,
        "expected a value in [0, 1), got ", t.adam_beta2);
  check("training.adam_eps", t.adam_eps > 0.0, "expected a positive number, got ", t.adam_eps);
  check("training.max_grad_norm", t.max_grad_norm >= 0.0,
        "expected at least 0 (0 = no clipping), got ", t.max_grad_norm);
  check("training.seed", t.seed >= 0, "expected at least 0, got ", t.seed);
  check("training.output_dir", !t.output_dir.empty(), "required");
  check("training.eval_every", t.eval_every >= 0, "expected at least 0, got ", t.eval_every);
  check("training.save_every", t.save_every >= 0, "expected at least 0, got ", t.save_every);
  check("training.keep_last", t.keep_last >= 1, "expected at least 1, got ", t.keep_last);
  check("training.resume", !t.resume.empty(),
        "expected auto, none, force or a checkpoint directory");
  check("training.threads", t.threads >= 0, "expected at least 0, got ", t.threads);
  check("training.stop_after", t.stop_after >= 0, "expected at least 0, got ", t.stop_after);
  one_of("training.nonfinite", t.nonfinite, {"stop", "skip"});
  check("training.max_skipped", t.max_skipped >= 1, "expected at least 1, got ", t.max_skipped);

  check("logging.log_every", logging.log_every >= 1, "expected at least 1, got ",
        logging.log_every);
  one_of("logging.progress", logging.progress, {"auto", "bar", "lines"});
  check("logging.peak_flops", logging.peak_flops >= 0.0,
        "expected at least 0 (0 = measure), got ", logging.peak_flops);
  one_of("parallel.strategy", parallel.strategy,
         {"auto", "none", "ddp", "zero1", "zero2", "fsdp", "zero3", "model_parallel", "pipeline"});
  const bool mp = parallel.strategy == "model_parallel";
  check("parallel.devices", mp == !parallel.devices.empty(),
        mp ? "model_parallel needs the devices of its stages, e.g. [cuda:0, cuda:1]"
           : "only model_parallel places layers on devices (set parallel.strategy: model_parallel)");
  const bool pipe = parallel.strategy == "pipeline";
  // model_parallel: a stage per device; pipeline: parallel.pp stages.
  const int64_t stages = mp ? static_cast<int64_t>(parallel.devices.size()) : parallel.pp;
  check("parallel.split", parallel.split.empty() ||
        ((mp || pipe) && static_cast<int64_t>(parallel.split.size()) == stages + 1),
        "expected one point per stage plus the layer count ([0, first layer of stage 2, ..., "
        "layers]) for ", stages, " stages of model_parallel or pipeline, got ",
        parallel.split.size(), " points");
  check("parallel.pp", pipe ? parallel.pp >= 2 : parallel.pp == 0,
        pipe ? "pipeline needs at least 2 stages (parallel.pp: 2 or more), got "
             : "only the pipeline strategy has stages (set parallel.strategy: pipeline), got ",
        parallel.pp);
  one_of("parallel.schedule", parallel.schedule, {"naive", "gpipe", "1f1b"});
  check("parallel.micro_batches", parallel.micro_batches >= 0 &&
        (parallel.micro_batches == 0 || training.grad_accum % parallel.micro_batches == 0),
        "expected 0 (= training.grad_accum) or a divisor of training.grad_accum (",
        training.grad_accum, "), got ", parallel.micro_batches);
  one_of("parallel.offload", parallel.offload, {"none", "optimizer"});
  check("parallel.offload", parallel.offload == "none" || parallel.strategy == "zero1" ||
        parallel.strategy == "zero2" || parallel.strategy == "fsdp" ||
        parallel.strategy == "zero3", "offload: optimizer needs parallel.strategy zero1, zero2 or "
        "fsdp (the sharded optimizer step is what moves to the CPU), got strategy ",
        parallel.strategy);
  check("parallel.bucket_mb", parallel.bucket_mb > 0 && std::isfinite(parallel.bucket_mb),
        "expected a positive number of MiB, got ", parallel.bucket_mb);
  check("parallel.timeout_s", parallel.timeout_s > 0 && std::isfinite(parallel.timeout_s),
        "expected a positive number of seconds, got ", parallel.timeout_s);

  // lora.targets names are checked against the model's modules by lora::resolve_targets when the
  // run starts (before anything is allocated); here only what needs no model.
  if (lora) {
    check("lora.r", lora->r >= 1, "expected a positive rank, got ", lora->r);
    check("lora.alpha", lora->alpha > 0 && std::isfinite(lora->alpha),
          "expected a positive number, got ", lora->alpha);
    check("lora.dropout", lora->dropout >= 0.0 && lora->dropout < 1.0,
          "expected a value in [0, 1), got ", lora->dropout);
    check("lora.targets", !lora->targets.empty(),
          "expected at least one module name (or all-linear)");
  }
  if (quant) {
    check("quant", lora.has_value(),
          "needs a lora section: the 4-bit base is frozen, only LoRA adapters train on it (QLoRA)");
    one_of("quant.type", quant->type, {"nf4"});
    const int64_t b = quant->blocksize;
    check("quant.blocksize", b >= 64 && b <= 4096 && (b & (b - 1)) == 0,
          "expected a power of two from 64 to 4096, got ", b);
    one_of("quant.compute_dtype", quant->compute_dtype, {"bf16", "fp32"});
  }
}

std::string TrainConfig::to_yaml() const {
  std::ostringstream os;
  os << "# resolved ftune train config (every key, defaults included)\n";
  emit_section(os, "model", model);
  emit_section(os, "data", data);
  // Exactly one of steps and epochs, so the file is a valid input again.
  std::set<std::string> skip;
  if (training.steps > 0 || training.epochs > 0.0) skip.insert(training.steps > 0 ? "epochs" : "steps");
  emit_section(os, "training", training, skip);
  emit_section(os, "logging", logging);
  emit_section(os, "parallel", parallel);
  if (lora) emit_section(os, "lora", *lora);
  if (quant) emit_section(os, "quant", *quant);
  return os.str();
}

std::map<std::string, std::string> TrainConfig::flatten() const {
  std::map<std::string, std::string> out;
  flatten_section(out, "model", model);
  flatten_section(out, "data", data);
  flatten_section(out, "training", training);
  flatten_section(out, "logging", logging);
  flatten_section(out, "parallel", parallel);
  if (lora) flatten_section(out, "lora", *lora);
  if (quant) flatten_section(out, "quant", *quant);
  return out;
}

std::vector<ConfigChange> diff_configs(const TrainConfig& before, const TrainConfig& after) {
  std::vector<ConfigChange> out;
  const auto a = before.flatten(), b = after.flatten();
  std::set<std::string> keys;
  for (const auto& kv : a) keys.insert(kv.first);
  for (const auto& kv : b) keys.insert(kv.first);
  auto value_of = [](const std::map<std::string, std::string>& m, const std::string& key) {
    auto it = m.find(key);
    return it == m.end() ? std::string("(none)") : it->second;
  };
  for (const auto& key : keys) {
    const std::string was = value_of(a, key), now = value_of(b, key);
    if (was != now) out.push_back({key, was, now});
  }
  return out;
}

bool keeps_run_on_resume(const std::string& key) {
  // What is logged and when, where files go and how often, how many CPU threads or which device
  // compute it: none of these changes which updates the model gets.
  static const std::set<std::string> kSameRun = {
      "model.device",        "training.eval_every", "training.eval_at_start",
      "training.save_every", "training.keep_last",  "training.stop_after",
      "training.resume",     "training.output_dir", "training.threads",
      "training.dump_batches", "parallel.timeout_s",  "parallel.bucket_mb",
      // What happens at a non-finite step (the error message suggests switching to skip).
      "training.nonfinite", "training.max_skipped",
      // Where layers sit and in which order micro-batches run: the same updates.
      "parallel.pp", "parallel.schedule", "parallel.micro_batches", "parallel.split",
      "parallel.devices"};
  return key.rfind("logging.", 0) == 0 || kSameRun.count(key) > 0;
}

}  // namespace ftune::config
