// Assembles and runs one training run; see run.h.
#include "train/run.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/dataset.h"
#include "lora/adapter.h"
#include "lora/lora.h"
#include "memory/estimate.h"
#include "memory/report.h"
#include "memory/tracker.h"
#include "model/device.h"
#include "model/hf_io.h"
#include "optim/cpu_adam.h"
#include "tokenizer/tokenizer.h"
#include "train/checkpoint_sharded.h"
#include "train/export.h"
#include "train/lora_strategy.h"
#include "train/loop.h"
#include "train/loss_plot.h"
#include "train/preempt.h"
#include "train/parallelize.h"
#include "train/report.h"

namespace ftune::train {
namespace fs = std::filesystem;

namespace {

constexpr char kPresetPrefix[] = "preset:";

// Where the model comes from: an HF dir or preset:NAME, its config, and its tokenizer's dir.
struct ModelSource {
  model::LlamaConfig config;
  std::string origin;  // "preset tiny" or "<dir>/config.json", for messages
  bool preset = false;
  fs::path dir;        // the HF dir, or <output_dir>/base for a preset (written by build_model)
};

ModelSource resolve_model_config(const config::TrainConfig& cfg) {
  const auto& path = cfg.model.path;
  ModelSource src;
  src.preset = path.rfind(kPresetPrefix, 0) == 0;
  if (src.preset) {
    const std::string name = path.substr(sizeof(kPresetPrefix) - 1);
    try {
      src.config = model::preset_config(name);
    } catch (const Error& e) {
      fail(cfg.where("model.path"), ": model.path: ", e.what());
    }
    src.origin = "preset " + name;
    src.dir = fs::path(cfg.training.output_dir) / "base";
  } else {
    FTUNE_CHECK(fs::is_directory(path), cfg.where("model.path"), ": model.path: ", path,
                ": no such directory (an HF model dir or preset:NAME)");
    src.config = model::load_config(path);
    src.origin = (fs::path(path) / "config.json").string();
    src.dir = path;
  }
  FTUNE_CHECK(cfg.data.seq_len <= src.config.max_position_embeddings, cfg.where("data.seq_len"),
              ": data.seq_len: ", cfg.data.seq_len, " exceeds max_position_embeddings ",
              src.config.max_position_embeddings, " of ", src.origin);
  return src;
}

void check_input_file(const config::TrainConfig& cfg, const char* key, const std::string& path) {
  std::error_code ec;
  FTUNE_CHECK(!fs::is_directory(path, ec), cfg.where(key), ": ", key, ": ", path,
              ": is a directory, expected a JSONL file");
  FTUNE_CHECK(fs::is_regular_file(path, ec), cfg.where(key), ": ", key, ": ", path,
              ": no such file");
}

// training.output_dir must be (or become) a writable directory: checked, and created, before
// anything is loaded, so a typo does not surface after a long tokenization.
void prepare_output_dir(const config::TrainConfig& cfg) {
  const fs::path out = cfg.training.output_dir;
  const std::string where = cfg.where("training.output_dir") + ": training.output_dir: " +
                            out.string();
  std::error_code ec;
  for (fs::path p = out; !p.empty(); p = p.parent_path()) {
    if (fs::exists(p, ec)) {
      FTUNE_CHECK(fs::is_directory(p, ec), where, ": ", p == out ? "exists and" : p.string(),
                  " is not a directory");
      break;
    }
    if (p == p.parent_path()) break;
  }
  fs::create_directories(out, ec);
  FTUNE_CHECK(!ec, where, ": cannot create: ", ec.message());
  const fs::path probe = out / (".ftune-probe-" + std::to_string(::getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  FTUNE_CHECK(fd >= 0, where, ": cannot write there: ", std::strerror(errno));
  ::close(fd);
  fs::remove(probe, ec);
}

void check_inputs(const config::TrainConfig& cfg) {
  const auto& t = cfg.training;
  check_input_file(cfg, "data.train", cfg.data.train);
  if (!cfg.data.valid.empty()) check_input_file(cfg, "data.valid", cfg.data.valid);
  if (t.resume != "none" && t.resume != "auto" && t.resume != "force") {
    // A dir whose files are damaged passes here: verify_checkpoint names the file later.
    FTUNE_CHECK(fs::is_directory(t.resume), cfg.where("training.resume"), ": training.resume: ",
                t.resume, ": not a complete checkpoint (expected auto, force, none or a "
                "checkpoints/step-N dir)");
  }
  prepare_output_dir(cfg);
}

// Reports examples that give no target token (one stderr line); fails when none is left.
void check_targets(const config::TrainConfig& cfg, const char* key,
                   const std::vector<data::Example>& examples, const data::BatchOptions& bo,
                   bool main) {
  if (examples.empty()) return;
  const data::TargetStats st = data::target_stats(examples, bo);
  const std::string cut = std::to_string(st.cut_to_nothing) + " with every target beyond data.seq_len " +
                          std::to_string(bo.seq_len) + ", " +
                          std::to_string(st.no_targets - st.cut_to_nothing) +
                          " with no target tokens at all (empty response or text)";
  FTUNE_CHECK(st.targets > 0, cfg.where(key), ": ", key, ": no example gives a target token to "
              "train on (", st.examples, " examples: ", cut, "); raise data.seq_len or check "
              "data.format and the data");
  if (main && (st.no_targets > 0 || st.truncated > 0)) {
    std::fprintf(stderr, "%s: %lld of %lld examples give no target token and add no loss (%s); "
                 "%lld truncated to data.seq_len\n",
                 key, static_cast<long long>(st.no_targets), static_cast<long long>(st.examples),
                 cut.c_str(), static_cast<long long>(st.truncated));
  }
}

struct TrainData {
  data::BatchStream train;
  std::vector<data::Batch> valid;
  size_t train_docs = 0, valid_docs = 0;
};

TrainData load_data(const config::TrainConfig& cfg, const ModelSource& src,
                    const tok::Tokenizer& tokenizer, bool main) {
  const auto& d = cfg.data;
  const auto& t = cfg.training;
  const data::Format format = data::parse_format(d.format, cfg.where("data.format"));
  std::vector<data::Example> train_examples = data::load_jsonl(d.train, format, tokenizer);
  std::vector<data::Example> valid_examples;
  if (!d.valid.empty()) {
    valid_examples = data::load_jsonl(d.valid, format, tokenizer);
  } else if (d.valid_fraction > 0) {
    std::tie(train_examples, valid_examples) = data::split_validation(
        std::move(train_examples), d.valid_fraction, static_cast<uint64_t>(t.seed));
    FTUNE_CHECK(!train_examples.empty(), cfg.where("data.valid_fraction"),
                ": data.valid_fraction: leaves no training examples");
  }
  const int64_t vocab = src.config.vocab_size;
  for (const auto* set : {&train_examples, &valid_examples}) {
    for (const auto& ex : *set) {
      for (int64_t id : ex.ids) {
        FTUNE_CHECK(id >= 0 && id < vocab, cfg.model.path, ": token id ", id,
                    " is outside the model's vocab_size ", vocab, " (", src.origin,
                    "): tokenizer and model do not match");
      }
    }
  }
  data::BatchOptions bo;
  bo.seq_len = d.seq_len;
  bo.packing = d.packing;
  bo.pad_id = tokenizer.pad_id().value_or(tokenizer.eos_id().value_or(0));
  bo.seed = static_cast<uint64_t>(t.seed);
  check_targets(cfg, "data.train", train_examples, bo, main);
  check_targets(cfg, d.valid.empty() ? "data.valid_fraction" : "data.valid", valid_examples, bo,
                main);
  const size_t train_docs = train_examples.size(), valid_docs = valid_examples.size();
  TrainData out{data::BatchStream(std::move(train_examples), bo), {}, train_docs, valid_docs};
  if (!valid_examples.empty()) {
    out.valid = data::BatchStream(std::move(valid_examples), bo).all_batches(t.micro_batch);
  }
  FTUNE_CHECK(out.train.rows_per_epoch() > 0, cfg.where("data.train"), ": data.train: ", d.train,
              ": no training rows after tokenization");
  return out;
}

// Optimizer steps of the run: training.steps, or the epochs over the global batch (micro_batch *
// grad_accum rows on each of `world` ranks).
int64_t total_steps_of(const config::TrainConfig& cfg, int64_t rows, int world) {
  const auto& t = cfg.training;
  if (t.steps > 0) return t.steps;
  const double per_step = static_cast<double>(t.micro_batch * t.grad_accum * world);
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(t.epochs * rows / per_step)));
}

// The checkpoint training.resume names, verified (verify_checkpoint): auto and force take the
// newest that verifies, reporting each newer one that does not on one line, and fail when there
// are checkpoints but none verifies (rather than start fresh over them); a path must verify.
// Rank 0 verifies (reading each file once) while the others wait; any_rank carries its verdict,
// so every rank loads the same checkpoint.
std::optional<fs::path> choose_checkpoint(const config::TrainConfig& cfg, Strategy& strategy) {
  const auto& t = cfg.training;
  const bool main = strategy.is_main(), named = t.resume != "auto" && t.resume != "force";
  std::vector<fs::path> dirs;
  if (named && t.resume != "none") dirs = {t.resume};
  if (!named) dirs = checkpoint_dirs(t.output_dir);
  for (const fs::path& dir : dirs) {
    std::string problem;
    if (main) {
      try {
        if (!verify_checkpoint(dir).has_checksums) {
          std::fprintf(stderr, "resume: warning: %s has no checksums.json (written by an older "
                       "ftune): loading it unverified\n", dir.c_str());
        }
      } catch (const std::exception& e) {  // ftune::Error, or a filesystem error reading it
        problem = e.what();
      }
    }
    strategy.barrier("barrier while rank 0 verifies checkpoint " + dir.string(), 3600);
    if (!strategy.any_rank(!problem.empty())) return dir;
    FTUNE_CHECK(!named, cfg.where("training.resume"), ": training.resume: ",
                main ? problem : dir.string() + ": rank 0 found it damaged");
    if (main) {
      std::fprintf(stderr, "resume: warning: skipping the damaged %s\n", problem.c_str());
    }
  }
  FTUNE_CHECK(dirs.empty(), cfg.where("training.resume"), ": training.resume: ", t.resume,
              ": none of the ", dirs.size(), " checkpoints in ", (fs::path(t.output_dir) /
              "checkpoints").string(), " is complete (each is named above); fix or remove them, "
              "or start fresh with training.resume: none or a new training.output_dir");
  return std::nullopt;
}

// The checkpoint to resume from, if any, after checking that it continues this same run: the
// config stored in it may differ only in keys that keep the run the same (else an error that
// names the keys; training.resume: force skips this), and its step must not exceed the run's.
std::optional<CheckpointInfo> find_resume(const config::TrainConfig& cfg, int64_t total_steps,
                                          int64_t rows, Strategy& strategy) {
  const auto& t = cfg.training;
  const bool main = strategy.is_main();
  const int world = static_cast<int>(strategy.data_shard().count);
  const std::optional<fs::path> dir = choose_checkpoint(cfg, strategy);
  if (!dir) return std::nullopt;
  CheckpointInfo info = read_checkpoint_info(*dir);
  const std::string origin = info.state_file.string();
  const char* steps_key = t.steps > 0 ? "training.steps" : "training.epochs";
  FTUNE_CHECK(info.state.step <= total_steps, cfg.where(steps_key), ": ", steps_key, ": the run "
              "would end at step ", total_steps, ", before the step ", info.state.step,
              " of the checkpoint it resumes (", dir->string(), "); raise it, or start fresh "
              "(a new training.output_dir, or training.resume: none)");
  FTUNE_CHECK(info.state.position < rows, origin, ": state.position: ", info.state.position,
              " is beyond the ", rows, " rows of an epoch of this run's data");
  if (!info.meta.contains("config")) return info;
  const config::TrainConfig saved =
      config::parse_train_config(info.meta.at("config").get<std::string>(), origin + " (config)");
  // The data stream is global (rows of micro_batch * grad_accum * world per step), so a run may
  // continue at another world size (DDP <-> one process) as long as that global batch stays.
  const int64_t saved_world = info.meta.value("world_size", int64_t{1});
  const bool same_global_batch = saved.training.micro_batch * saved.training.grad_accum *
                                     saved_world ==
                                 cfg.training.micro_batch * cfg.training.grad_accum * world;
  auto batch_layout_key = [](const std::string& k) {
    return k == "training.micro_batch" || k == "training.grad_accum" || k == "parallel.strategy";
  };
  std::string changed, notes, first_key;
  if (!same_global_batch) {
    first_key = "training.micro_batch";
    changed = "the global batch (micro_batch x grad_accum x ranks) " +
              std::to_string(saved.training.micro_batch) + " x " +
              std::to_string(saved.training.grad_accum) + " x " + std::to_string(saved_world) +
              " -> " + std::to_string(cfg.training.micro_batch) + " x " +
              std::to_string(cfg.training.grad_accum) + " x " + std::to_string(world);
  }
  for (const auto& c : config::diff_configs(saved, cfg)) {
    // How a run is stopped and resumed is expected to change between its parts: no note.
    if (c.key == "training.resume" || c.key == "training.stop_after") continue;
    if (batch_layout_key(c.key) && !same_global_batch) continue;  // reported as the global batch
    const std::string item = c.key + " " + c.before + " -> " + c.after;
    if (c.key == "training.steps" || c.key == "training.epochs" ||
        config::keeps_run_on_resume(c.key) || batch_layout_key(c.key)) {
      notes += (notes.empty() ? "" : ", ") + item;
    } else {
      if (first_key.empty()) first_key = c.key;
      changed += (changed.empty() ? "" : ", ") + item;
    }
  }
  if (!changed.empty() && t.resume != "force") {
    fail(cfg.where(first_key), ": ", first_key, ": the config differs from the one of checkpoint ",
         dir->string(), " in ", changed, "; to start fresh use a new training.output_dir or "
         "training.resume: none; to continue anyway set training.resume: force");
  }
  if (main && !changed.empty()) {
    std::fprintf(stderr, "resume: training.resume is force: continuing despite %s\n",
                 changed.c_str());
  }
  if (main && !notes.empty()) {
    std::fprintf(stderr, "resume: changes that keep the run the same: %s\n", notes.c_str());
  }
  return info;
}

// The LoRA options of the run (targets resolved and checked against the model's shapes), or none.
// Runs before anything is allocated.
std::optional<lora::LoraOptions> lora_options(const config::TrainConfig& cfg,
                                              const ModelSource& src) {
  if (!cfg.lora) return std::nullopt;
  const config::LoraSection& l = *cfg.lora;
  lora::LoraOptions o;
  o.r = l.r;
  o.alpha = l.alpha;
  o.dropout = l.dropout;
  o.rslora = l.rslora;
  o.targets = lora::resolve_targets(l.targets, cfg.where("lora.targets") + ": lora.targets");
  // A [r, in] and B [out, r] need r <= min(in, out) of every targeted linear.
  const model::LlamaConfig& c = src.config;
  const int64_t q = c.num_attention_heads * c.dim_head(), kv = c.num_key_value_heads * c.dim_head();
  const std::map<std::string, int64_t> smallest_dim = {
      {"q_proj", std::min(q, c.hidden_size)},  {"k_proj", std::min(kv, c.hidden_size)},
      {"v_proj", std::min(kv, c.hidden_size)}, {"o_proj", std::min(q, c.hidden_size)},
      {"gate_proj", std::min(c.intermediate_size, c.hidden_size)},
      {"up_proj", std::min(c.intermediate_size, c.hidden_size)},
      {"down_proj", std::min(c.intermediate_size, c.hidden_size)}};
  for (const auto& t : o.targets) {
    FTUNE_CHECK(o.r <= smallest_dim.at(t), cfg.where("lora.r"), ": lora.r: ", o.r,
                " exceeds the smallest dimension ", smallest_dim.at(t), " of ", t, " in ",
                src.origin);
  }
  return o;
}

// How the model's weights are held. Full fine-tuning keeps fp32 master weights (bf16 compute
// comes from autocast). A LoRA base is frozen, so it needs no fp32 master copy: it is stored in
// model.dtype, or quantized (quant); the adapters are fp32 whatever the base (lora::apply_lora).
model::LoadOptions load_options(const config::TrainConfig& cfg, at::Device device) {
  model::LoadOptions lo;
  lo.dtype = cfg.lora && cfg.model.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  lo.device = device;
  if (cfg.quant) {
    quant::QuantOptions q;
    q.type = cfg.quant->type;
    q.double_quant = cfg.quant->double_quant;
    q.blocksize = cfg.quant->blocksize;
    q.compute_dtype = cfg.quant->compute_dtype == "bf16" ? at::kBFloat16 : at::kFloat;
    lo.quant = q;
  }
  return lo;
}

model::LlamaForCausalLM build_model(const config::TrainConfig& cfg, const ModelSource& src,
                                    at::Device device, Strategy& strategy) {
  const bool main = strategy.is_main();
  device = strategy.load_device(device);
  const model::LoadOptions lo = load_options(cfg, device);
  model::LlamaForCausalLM m{nullptr};
  if (src.preset) {
    src.config.check_fits_in_memory(at::kFloat, cfg.where("model.path") + ": model.path: " +
                                                    src.origin);
    m = model::LlamaForCausalLM(src.config);  // fp32, uninitialized until init_weights
    model::init_weights(m, static_cast<uint64_t>(cfg.training.seed));
    // The initial weights in HF layout: the base a resumed or replayed run starts from.
    if (main) model::save_model(src.dir, m);
    strategy.barrier("barrier after rank 0 wrote the preset's base model", 1800);
    if (lo.quant) {
      m = model::load_model(src.dir, lo);  // quantized as an HF dir would be
    } else {
      m->to(device, *lo.dtype);
    }
  } else {
    m = model::load_model(src.dir, lo);
  }
  FTUNE_CHECK(cfg.lora || !model::has_nf4_linears(m), cfg.where("model.path"), ": model.path: ",
              src.dir.string(), " holds 4-bit (bitsandbytes NF4) linear weights, which full "
              "fine-tuning cannot update: add a lora section (QLoRA), or train the unquantized "
              "model");
  m->set_grad_checkpointing(cfg.model.grad_checkpointing);
  return m;
}

optim::AdamWOptions adamw_options(const config::TrainingOptions& t) {
  optim::AdamWOptions ao;
  ao.beta1 = t.adam_beta1;
  ao.beta2 = t.adam_beta2;
  ao.eps = t.adam_eps;
  ao.fused = t.adam_fused;
  ao.weight_decay = t.weight_decay;
  return ao;
}

LoopOptions loop_options(const config::TrainConfig& cfg, const ModelSource& src,
                         int64_t total_steps, at::Device device, const std::string& yaml,
                         int world, int ranks) {
  const auto& t = cfg.training;
  const bool bf16 = cfg.model.dtype == "bf16";
  LoopOptions lo;
  lo.total_steps = total_steps;
  lo.micro_batch = t.micro_batch;
  lo.grad_accum = t.grad_accum;
  lo.max_grad_norm = t.max_grad_norm;
  lo.schedule.kind = optim::parse_lr_schedule(t.lr_schedule, cfg.where("training.lr_schedule"));
  lo.schedule.lr = t.lr;
  lo.schedule.warmup_steps = t.warmup_steps;
  lo.schedule.total_steps = total_steps;
  lo.log_every = cfg.logging.log_every;
  lo.eval_every = t.eval_every;
  lo.eval_at_start = t.eval_at_start;
  lo.save_every = t.save_every;
  lo.keep_last = t.keep_last;
  lo.stop_after = t.stop_after;
  lo.bf16_autocast = bf16;
  lo.dump_batches = t.dump_batches;
  lo.stop_signal = [] { return StopSignals::received(); };
  lo.skip_nonfinite = t.nonfinite == "skip";
  lo.max_skipped = t.max_skipped;
  lo.progress_bar = cfg.logging.progress == "bar" ||
                    (cfg.logging.progress == "auto" && ::isatty(STDERR_FILENO));
  // MFU's denominator: every rank's device works on the logged tokens (data-parallel replicas
  // on their own rows, pipeline stages on their share of the layers).
  lo.peak_flops = ranks * (cfg.logging.peak_flops > 0
                               ? cfg.logging.peak_flops
                               : measure_matmul_flops(device, bf16 ? at::kBFloat16 : at::kFloat));
  lo.flops_per_token = train_flops_per_token(src.config, cfg.data.seq_len);
  lo.device = device;
  lo.output_dir = t.output_dir;
  lo.checkpoint_meta = {{"total_steps", total_steps}, {"config", yaml}, {"world_size", world}};
  lo.tokenizer_dir = src.dir;
  lo.base_model = src.dir.string();
  return lo;
}

// The estimator's prediction for this rank (`ftune memory` on the run's own config), tensors only:
// the framework allowance (CUDA context, workspaces, fragmentation) is no tensor the measurement
// counts. Empty when the estimator does not model the setup (it says why in `reason`).
struct MemoryPrediction {
  int64_t bytes = 0;
  nlohmann::json breakdown;  // memory::breakdown_json of the rank (pipeline: the worst stage)
  std::string reason;
  at::Device device = at::kCPU;  // where the measurement was taken
};

MemoryPrediction predict_memory(const config::TrainConfig& cfg, const model::LlamaConfig& c,
                                const Strategy& strategy, at::Device device,
                                double target_fraction) {
  MemoryPrediction p;
  p.device = device;
  try {
    memory::EstimateOptions eo = memory::options_from_train_config(cfg, strategy.world_size());
    eo.overhead_bytes = 0;
    eo.target_fraction = std::clamp(target_fraction, 1e-6, 1.0);
    const memory::Estimate e = memory::estimate(c, eo);
    p.breakdown = memory::breakdown_json(e.rank);
    p.bytes = e.rank.total();
    if (eo.strategy == memory::Strategy::kPipeline && !e.stage_totals.empty()) {
      // rank = stage x dp + replica (pipeline_strategy.h)
      p.bytes = e.stage_totals.at(static_cast<size_t>(strategy.rank() / e.dp));
    } else if (eo.strategy == memory::Strategy::kModelParallel) {
      // All stages live in this process; on CPU they share one allocator.
      p.bytes = 0;
      for (int64_t b : e.stage_totals) p.bytes += b;
      if (!device.is_cpu()) p = {0, {}, "model_parallel spreads over devices", device};
    }
  } catch (const std::exception& ex) {
    p = {0, {}, ex.what(), device};
  }
  return p;
}

// Saves final/ (when the run finished) and the loss plot, prints the summary.
RunSummary finalize(const TrainState& state, int64_t total_steps, model::LlamaForCausalLM& m,
                    const optim::AdamW& opt, const ModelSource& src, const fs::path& out,
                    const fs::path& metrics_path, Strategy& strategy,
                    const MemoryPrediction& predicted) {
  const bool main = strategy.is_main();
  RunSummary s;
  s.measured_peak_bytes = state.step_peak_bytes;
  s.predicted_peak_bytes = predicted.bytes;
  s.replicas = strategy.check_replicas();
  s.strategy = strategy.name();
  s.world_size = strategy.world_size();
  s.comm_bytes = state.comm_bytes;
  s.comm_exposed_s = state.comm_exposed_s;
  s.params = param_report(m, opt);
  s.steps = state.step;
  s.total_steps = total_steps;
  s.tokens = state.tokens_seen;
  s.train_seconds = state.elapsed_s;
  s.final_loss = state.last_loss;
  s.eval_loss = state.last_eval_loss;
  s.eval_step = state.last_eval_step;
  s.finished = state.step >= total_steps;
  s.stop_signal = state.stop_signal;
  s.output_dir = out;
  if (auto ck = latest_checkpoint(out)) s.last_checkpoint = *ck;
  if (s.finished) {
    // Every rank takes part (a sharded model is gathered unit by unit); rank 0 writes.
    const fs::path tmp = out / (".tmp-final-" + std::to_string(::getpid()));
    std::error_code ec;
    if (main) fs::remove_all(tmp, ec);
    try {
      save_trained_streamed(tmp, m, src.dir.string(), strategy);  // a model dir, or an adapter dir
      if (main) {
        model::copy_tokenizer_files(src.dir, tmp);
        replace_dir_atomic(tmp, out / "final");
        s.final_dir = out / "final";
      }
    } catch (...) {
      if (main) fs::remove_all(tmp, ec);  // a full disk gets back what the failed write took
      throw;
    }
  }
  if (!main) return s;
  write_loss_plot(metrics_path, out / "loss_curve.svg");
  std::ostringstream os;
  os << (s.finished ? "done: " : "stopped: ") << s.steps << "/" << s.total_steps << " steps, "
     << s.tokens << " tokens in " << format_duration(s.train_seconds) << " ("
     << format_number("%.0f", s.train_seconds > 0 ? s.tokens / s.train_seconds : 0) << " tok/s)\n";
  os << "final loss " << format_number("%.4f", s.final_loss);
  if (std::isfinite(s.eval_loss)) {
    // An evaluation from an earlier step (stop_after between evals) says which step it was.
    os << (s.eval_step == s.steps ? ", eval loss " : ", last eval loss ")
       << format_number("%.4f", s.eval_loss) << " (ppl "
       << format_number("%.3f", std::exp(s.eval_loss));
    if (s.eval_step != s.steps && s.eval_step >= 0) os << ", at step " << s.eval_step;
    os << ")";
  }
  os << "\n";
  os << format_param_report(s.params) << "\n";
  if (!s.replicas.empty()) {  // a data-parallel strategy, at any world size
    os << s.strategy << ": " << s.world_size << (s.world_size == 1 ? " rank" : " ranks")
       << "; rank 0 sent " << format_number("%.1f", s.comm_bytes / 1e6) << " MB (ring), waited "
       << format_number("%.2f", s.comm_exposed_s) << " s on communication ("
       << format_number("%.1f", s.train_seconds > 0 ? 100 * s.comm_exposed_s / s.train_seconds : 0)
       << "% of training time)\n";
    os << s.replicas << "\n";
  }
  if (!s.final_dir.empty()) {
    os << (lora::has_lora(m) ? "adapter: " : "model: ") << s.final_dir.string() << "\n";
  }
  if (!s.last_checkpoint.empty()) os << "checkpoint: " << s.last_checkpoint.string() << "\n";
  if (s.measured_peak_bytes > 0) {
    // Rank 0's figures; <output_dir>/memory.json has the predicted breakdown beside them.
    os << "memory: peak " << format_number("%.1f", s.measured_peak_bytes / 1e6)
       << " MB of tensors in a step ("
       << (predicted.device.is_cuda() ? "CUDA allocator" : "CPU tracker")
       << ")";
    if (s.predicted_peak_bytes > 0) {
      os << ", predicted " << format_number("%.1f", s.predicted_peak_bytes / 1e6) << " MB (ftune memory, "
         << "without the framework allowance): measured/predicted "
         << format_number("%.3f", static_cast<double>(s.measured_peak_bytes) / s.predicted_peak_bytes);
    } else if (!predicted.reason.empty()) {
      os << "; no prediction: " << predicted.reason;
    }
    os << "\n";
    const nlohmann::json mem = {
        {"device", predicted.device.str()},
        {"measured", {{"step_peak_tensor_bytes", s.measured_peak_bytes},
                      {"trainable_bytes", s.params.trainable_bytes},
                      {"frozen_base_bytes", s.params.base_bytes},
                      {"optimizer_bytes", s.params.optimizer_bytes}}},
        {"predicted", {{"total", s.predicted_peak_bytes}, {"rank", predicted.breakdown}}}};
    write_file_atomic(out / "memory.json", mem.dump(2) + "\n");
  }
  os << "metrics: " << metrics_path.string() << " (plot: " << (out / "loss_curve.svg").string()
     << ")\n";
  if (s.stop_signal != 0) {
    os << "stopped by " << (s.stop_signal == SIGINT ? "SIGINT" : "SIGTERM") << " after step "
       << s.steps << " (checkpoint written); run the same command again to resume\n";
  }
  if (!s.finished) os << "resume with training.resume: auto (same output_dir)\n";
  std::cout << os.str() << std::flush;
  return s;
}

// Files a run killed mid-write left in output_dir: checkpoint temps, a final/ switch cut short.
void clean_up_interrupted_writes(const fs::path& out) {
  remove_stale_checkpoint_temps(out);
  recover_replaced_dir(out / "final");
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    if (e.path().filename().string().rfind(".tmp-final-", 0) == 0) doomed.push_back(e.path());
  }
  for (const auto& p : doomed) fs::remove_all(p, ec);
}

}  // namespace

namespace {

// Steps 2-6 of run_training, once the inputs are checked and the strategy is built.
RunSummary run(const config::TrainConfig& cfg, const ModelSource& src,
               const std::optional<lora::LoraOptions>& lora, Strategy& strategy,
               at::Device device) {
  const bool main = strategy.is_main();
  // The data-parallel replicas: each reads its own rows (the stages of a pipeline share theirs).
  const int world = static_cast<int>(strategy.data_shard().count);
  const auto& t = cfg.training;
  const fs::path out = t.output_dir;

  // 2. Tokenizer and data (before the model: data errors should not wait for a big load).
  if (src.preset && main) model::write_byte_level_tokenizer(src.dir);
  strategy.barrier("barrier after rank 0 wrote the preset's tokenizer");
  const tok::Tokenizer tokenizer = tok::Tokenizer::load(src.dir);
  tok::check_fits_vocab(tokenizer, src.config.vocab_size, src.origin);
  TrainData data = load_data(cfg, src, tokenizer, main);
  const int64_t rows = data.train.rows_per_epoch();
  const int64_t total_steps = total_steps_of(cfg, rows, world);
  if (main) clean_up_interrupted_writes(out);
  strategy.barrier("barrier after rank 0 cleaned up interrupted writes");
  const std::optional<CheckpointInfo> resume = find_resume(cfg, total_steps, rows, strategy);

  // 3. Inputs are good: the resolved config goes next to the outputs, and to stdout.
  const std::string yaml = cfg.to_yaml();
  if (main) {
    write_file_atomic(out / "config.yaml", yaml);
    std::cout << yaml << std::flush;
  }

  // 4. Model, strategy, optimizer; then the checkpoint's state over them.
  model::LlamaForCausalLM m = build_model(cfg, src, device, strategy);
  std::optional<LoraStrategy> lora_strategy;
  if (lora) lora_strategy.emplace(strategy, *lora, static_cast<uint64_t>(t.seed));
  Strategy& run_strategy = lora_strategy ? static_cast<Strategy&>(*lora_strategy) : strategy;
  optim::NamedTensors trained = run_strategy.prepare(m);
  optim::AdamWOptions ao = adamw_options(t);
  // Offload: the strategy's pieces are host tensors; step them with the CPU kernel.
  ao.cpu_kernel = cfg.parallel.offload == "optimizer";
  optim::AdamW opt(std::move(trained), ao, run_strategy.decay_flags());
  if (lora && t.dump_batches && !resume) {
    // With the dumped batches, the adapter the run starts from: what a replay needs besides the
    // base (tests feed both to transformers + PEFT). Every rank takes part (FSDP gathers).
    save_trained_streamed(out / "batches" / "initial_adapter", m, src.dir.string(), run_strategy);
  }
  TrainState state;
  if (resume) {
    const fs::path dir = resume->state_file.parent_path();
    // A sharding strategy, or a sharded checkpoint: piece by piece, by flat range.
    const std::vector<PieceInfo> layout = run_strategy.piece_layout();
    if (!layout.empty() || is_sharded_checkpoint(dir)) {
      state = load_checkpoint_pieces(dir, layout, opt, device);
      run_strategy.pieces_loaded();
    } else {
      state = load_checkpoint(dir, m, opt, [&](const auto& st, const std::string& origin) {
        run_strategy.load_optimizer_state(opt, st, origin);
      });
    }
    data.train.restore(state.epoch, state.position);
    if (main) {
      std::fprintf(stderr, "resuming from %s (step %lld)\n", dir.c_str(),
                   static_cast<long long>(state.step));
    }
  }
  MetricsLog metrics(out / "metrics.jsonl", state.step, main);

  // 5. Loop.
  LoopOptions lo =
      loop_options(cfg, src, total_steps, device, yaml, world, strategy.world_size());
  lo.measure_memory = device.is_cuda() || memory::cpu_tracker_installed();
  lo.predict_peak_bytes = [&](double target_fraction) {
    return predict_memory(cfg, src.config, strategy, device, target_fraction).bytes;
  };
  if (main) {
    const int64_t global_rows = t.micro_batch * t.grad_accum * world;
    const int ranks_n = strategy.world_size();
    const std::string ranks =
        ranks_n > 1 ? " x " + std::to_string(ranks_n) + " ranks (" + strategy.name() + ")" : "";
    std::fprintf(stderr,
                 "training %s (%lld parameters) on %s%s: %zu train / %zu valid documents, %lld "
                 "rows per epoch, %lld steps of %lld rows; peak %.3g FLOP/s (%s%s)\n",
                 src.origin.c_str(), static_cast<long long>(src.config.num_parameters()),
                 device.str().c_str(),
                 ranks.c_str(),
                 data.train_docs, data.valid_docs, static_cast<long long>(rows),
                 static_cast<long long>(total_steps), static_cast<long long>(global_rows),
                 lo.peak_flops, cfg.logging.peak_flops > 0 ? "configured" : "measured matmul",
                 ranks_n > 1 ? ", all ranks" : "");
    std::fprintf(stderr, "%s\n", format_param_report(param_report(m, opt)).c_str());
    if (cfg.parallel.offload == "optimizer") {
      std::fprintf(stderr, "optimizer: AdamW on the CPU (parallel.offload: optimizer; %s kernel, "
                   "%d threads): master pieces, gradient shards and AdamW state in host memory\n",
                   optim::cpu_adam_isa(), at::get_num_threads());
    }
  }
  {
    const StopSignals signals;  // SIGTERM/SIGINT: stop after the step, with a checkpoint
    state = train_loop(m, run_strategy, opt, data.train, data.valid, state, lo, metrics);
  }

  // 6. Final model and summary.
  // The prediction at the most targets a micro-batch had: the step the measured peak comes from.
  const MemoryPrediction predicted =
      predict_memory(cfg, src.config, strategy, device,
                     state.max_target_fraction > 0 ? state.max_target_fraction : 1.0);
  return finalize(state, total_steps, m, opt, src, out, metrics.path(), run_strategy, predicted);
}

}  // namespace

RunSummary run_training(const config::TrainConfig& cfg, Strategy* strategy_in) {
  cfg.validate();
  const auto& t = cfg.training;

  // 1. Everything that can be checked before allocating: model shape vs data, files, resume.
  const ModelSource src = resolve_model_config(cfg);
  const std::optional<lora::LoraOptions> lora = lora_options(cfg, src);
  check_inputs(cfg);
  const at::Device configured =
      model::parse_device(cfg.model.device, cfg.where("model.device") + ": model.device");
  if (t.threads > 0) at::set_num_threads(static_cast<int>(t.threads));
  // Counts live CPU tensor bytes from here on (the measured side of `ftune memory`'s estimate).
  if (configured.is_cpu()) memory::install_cpu_tracker();
  at::manual_seed(static_cast<uint64_t>(t.seed));

  // The strategy: the caller's, or the one the parallel section and the environment say
  // (rendezvous with the other ranks happens here).
  ParallelRun pr;
  if (strategy_in == nullptr) {
    pr = parallelize(cfg, configured);
  } else {
    pr.device = configured;
  }
  Strategy& strategy = strategy_in ? *strategy_in : *pr.strategy;
  try {
    return run(cfg, src, lora, strategy, pr.device);
  } catch (const std::exception& e) {
    // The other ranks name this one and its error instead of waiting out their timeout.
    strategy.mark_failed(e.what());
    throw;
  }
}

}  // namespace ftune::train
