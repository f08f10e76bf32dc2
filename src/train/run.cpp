// Assembles and runs one training run; see run.h.
#include "train/run.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "data/dataset.h"
#include "model/hf_io.h"
#include "tokenizer/tokenizer.h"
#include "train/loop.h"
#include "train/loss_plot.h"

namespace ftune::train {
namespace fs = std::filesystem;

namespace {

constexpr char kPresetPrefix[] = "preset:";

at::Device parse_train_device(const config::TrainConfig& cfg) {
  const std::string& s = cfg.model.device;
  if (s == "cpu") return at::kCPU;
  FTUNE_CHECK(at::hasCUDA(), cfg.where("model.device"), ": model.device: ", s,
              ": no CUDA device available to this build/machine");
  if (s == "cuda") return at::Device(at::kCUDA, 0);
  int idx = -1;
  try {
    idx = std::stoi(s.substr(5));
  } catch (const std::exception&) {
  }
  FTUNE_CHECK(idx >= 0, cfg.where("model.device"), ": model.device: expected cuda:N, got \"", s,
              "\"");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(idx));
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), f, v);
  return buf;
}

}  // namespace

RunSummary run_training(const config::TrainConfig& cfg, Strategy* strategy_in) {
  cfg.validate();
  SingleDevice single_device;
  Strategy& strategy = strategy_in ? *strategy_in : single_device;
  const bool main = strategy.is_main();
  const auto& mo = cfg.model;
  const auto& d = cfg.data;
  const auto& t = cfg.training;
  const fs::path out = t.output_dir;

  // 1. Everything that can be checked before allocating: model shape vs data, files, resume.
  const bool preset = mo.path.rfind(kPresetPrefix, 0) == 0;
  const std::string preset_name = preset ? mo.path.substr(sizeof(kPresetPrefix) - 1) : "";
  model::LlamaConfig mc;
  std::string model_origin;
  if (preset) {
    try {
      mc = model::preset_config(preset_name);
    } catch (const Error& e) {
      fail(cfg.where("model.path"), ": model.path: ", e.what());
    }
    model_origin = "preset " + preset_name;
  } else {
    FTUNE_CHECK(fs::is_directory(mo.path), cfg.where("model.path"), ": model.path: ", mo.path,
                ": no such directory (an HF model dir or preset:NAME)");
    mc = model::load_config(mo.path);
    model_origin = (fs::path(mo.path) / "config.json").string();
  }
  FTUNE_CHECK(d.seq_len <= mc.max_position_embeddings, cfg.where("data.seq_len"),
              ": data.seq_len: ", d.seq_len, " exceeds max_position_embeddings ",
              mc.max_position_embeddings, " of ", model_origin);
  const data::Format format = data::parse_format(d.format, cfg.where("data.format"));
  FTUNE_CHECK(fs::is_regular_file(d.train), cfg.where("data.train"), ": data.train: ", d.train,
              ": no such file");
  FTUNE_CHECK(d.valid.empty() || fs::is_regular_file(d.valid), cfg.where("data.valid"),
              ": data.valid: ", d.valid, ": no such file");
  std::optional<fs::path> resume_from;
  if (t.resume != "none" && t.resume != "auto") {
    FTUNE_CHECK(fs::exists(fs::path(t.resume) / "trainer_state.json"), cfg.where("training.resume"),
                ": training.resume: ", t.resume,
                ": not a complete checkpoint (expected auto, none or a checkpoints/step-N dir)");
    resume_from = t.resume;
  }
  const at::Device device = parse_train_device(cfg);
  const bool bf16 = mo.dtype == "bf16";

  if (t.threads > 0) at::set_num_threads(static_cast<int>(t.threads));
  at::manual_seed(static_cast<uint64_t>(t.seed));

  // 2. Tokenizer and data (before the model: data errors should not wait for a big load).
  const fs::path tok_dir = preset ? out / "base" : fs::path(mo.path);
  if (preset && main) model::write_byte_level_tokenizer(tok_dir);
  tok::Tokenizer tokenizer = tok::Tokenizer::load(tok_dir);
  tok::check_fits_vocab(tokenizer, mc.vocab_size, model_origin);
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
  for (const auto* set : {&train_examples, &valid_examples}) {
    for (const auto& ex : *set) {
      for (int64_t id : ex.ids) {
        FTUNE_CHECK(id >= 0 && id < mc.vocab_size, mo.path, ": token id ", id,
                    " is outside the model's vocab_size ", mc.vocab_size, " (", model_origin,
                    "): tokenizer and model do not match");
      }
    }
  }
  data::BatchOptions bo;
  bo.seq_len = d.seq_len;
  bo.packing = d.packing;
  bo.pad_id = tokenizer.pad_id().value_or(tokenizer.eos_id().value_or(0));
  bo.seed = static_cast<uint64_t>(t.seed);
  const size_t n_train_docs = train_examples.size(), n_valid_docs = valid_examples.size();
  data::BatchStream train(std::move(train_examples), bo);
  std::vector<data::Batch> valid;
  if (!valid_examples.empty()) {
    valid = data::BatchStream(std::move(valid_examples), bo).all_batches(t.micro_batch);
  }
  const int64_t rows = train.rows_per_epoch();
  FTUNE_CHECK(rows > 0, cfg.where("data.train"), ": data.train: ", d.train,
              ": no training rows after tokenization");
  const int64_t per_step = t.micro_batch * t.grad_accum;
  const int64_t total_steps =
      t.steps > 0 ? t.steps
                  : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(
                                             t.epochs * static_cast<double>(rows) / per_step)));

  // 3. Inputs are good: the resolved config goes next to the outputs, and to stdout.
  const std::string yaml = cfg.to_yaml();
  if (main) {
    fs::create_directories(out);
    write_file_atomic(out / "config.yaml", yaml);
    std::cout << yaml << std::flush;
  }

  // 4. Model, strategy, optimizer.
  model::LlamaForCausalLM m{nullptr};
  if (preset) {
    m = model::LlamaForCausalLM(mc);
    model::init_weights(m, static_cast<uint64_t>(t.seed));
    m->to(at::kFloat);
    // The initial weights in HF layout: the base a resumed or replayed run starts from.
    if (main) model::save_model(tok_dir, m);
    m->to(device);
  } else {
    model::LoadOptions lo;
    lo.dtype = at::kFloat;  // fp32 master weights; bf16 compute comes from autocast
    lo.device = device;
    m = model::load_model(mo.path, lo);
  }
  m->set_grad_checkpointing(mo.grad_checkpointing);
  optim::AdamWOptions ao;
  ao.beta1 = t.adam_beta1;
  ao.beta2 = t.adam_beta2;
  ao.eps = t.adam_eps;
  ao.fused = t.adam_fused;
  ao.weight_decay = t.weight_decay;
  optim::AdamW opt(strategy.prepare(m), ao);

  // 5. Resume.
  TrainState state;
  if (main) remove_stale_checkpoint_temps(out);
  if (t.resume == "auto") resume_from = latest_checkpoint(out);
  if (resume_from) {
    state = load_checkpoint(*resume_from, m, opt);
    train.restore(state.epoch, state.position);
    if (main) {
      std::fprintf(stderr, "resuming from %s (step %lld)\n", resume_from->c_str(),
                   static_cast<long long>(state.step));
    }
  }
  MetricsLog metrics(out / "metrics.jsonl", state.step);

  // 6. Loop.
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
  lo.progress_bar = cfg.logging.progress == "bar" ||
                    (cfg.logging.progress == "auto" && ::isatty(STDERR_FILENO));
  lo.peak_flops = cfg.logging.peak_flops > 0
                      ? cfg.logging.peak_flops
                      : measure_matmul_flops(device, bf16 ? at::kBFloat16 : at::kFloat);
  lo.flops_per_token = train_flops_per_token(mc, d.seq_len);
  lo.device = device;
  lo.output_dir = out;
  lo.checkpoint_meta = {{"total_steps", total_steps}, {"config", yaml}};
  if (main) {
    std::fprintf(stderr,
                 "training %s (%lld parameters) on %s: %zu train / %zu valid documents, %lld rows "
                 "per epoch, %lld steps of %lld rows; peak %.3g FLOP/s (%s)\n",
                 model_origin.c_str(), static_cast<long long>(mc.num_parameters()),
                 device.str().c_str(), n_train_docs, n_valid_docs, static_cast<long long>(rows),
                 static_cast<long long>(total_steps), static_cast<long long>(per_step),
                 lo.peak_flops, cfg.logging.peak_flops > 0 ? "configured" : "measured matmul");
  }
  state = train_loop(m, strategy, opt, train, valid, state, lo, metrics);

  // 7. Final model and summary.
  RunSummary s;
  s.steps = state.step;
  s.total_steps = total_steps;
  s.tokens = state.tokens_seen;
  s.train_seconds = state.elapsed_s;
  s.final_loss = state.last_loss;
  s.eval_loss = state.last_eval_loss;
  s.finished = state.step >= total_steps;
  s.output_dir = out;
  if (auto ck = latest_checkpoint(out)) s.last_checkpoint = *ck;
  if (s.finished && main) {
    const fs::path tmp = out / (".tmp-final-" + std::to_string(::getpid()));
    std::error_code ec;
    fs::remove_all(tmp, ec);
    model::save_model(tmp, m);
    model::copy_tokenizer_files(tok_dir, tmp);
    replace_dir_atomic(tmp, out / "final");
    s.final_dir = out / "final";
  }
  if (main) write_loss_plot(metrics.path(), out / "loss_curve.svg");
  if (main) {
    std::ostringstream os;
    os << (s.finished ? "done: " : "stopped: ") << s.steps << "/" << s.total_steps << " steps, "
       << s.tokens << " tokens in " << format_duration(s.train_seconds) << " ("
       << fmt("%.0f", s.train_seconds > 0 ? s.tokens / s.train_seconds : 0) << " tok/s)\n";
    os << "final loss " << fmt("%.4f", s.final_loss);
    if (std::isfinite(s.eval_loss)) {
      os << ", eval loss " << fmt("%.4f", s.eval_loss) << " (ppl "
         << fmt("%.3f", std::exp(s.eval_loss)) << ")";
    }
    os << "\n";
    if (!s.final_dir.empty()) os << "model: " << s.final_dir.string() << "\n";
    if (!s.last_checkpoint.empty()) os << "checkpoint: " << s.last_checkpoint.string() << "\n";
    os << "metrics: " << metrics.path().string() << " (plot: "
       << (out / "loss_curve.svg").string() << ")\n";
    if (!s.finished) os << "resume with training.resume: auto (same output_dir)\n";
    std::cout << os.str() << std::flush;
  }
  return s;
}

}  // namespace ftune::train
