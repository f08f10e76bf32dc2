// The `ftune train` config: YAML sections model / data / training / logging, each an options
// struct with defaults, and the optional sections lora and quant, whose presence (even empty,
// `lora: {}`) turns LoRA / QLoRA's 4-bit base on. load_train_config() reads the file, applies
// `--set section.key=value` overrides and rejects unknown sections and keys; validate() checks
// every value (and the cross-field rules) once, before anything is allocated, with errors naming
// file:line and key. The parallel section says how several processes share the work (DDP).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "config/yaml_reader.h"

namespace ftune::config {

struct ModelOptions {
  std::string path;             // HF model dir, or "preset:NAME" (fresh init from training.seed,
                                // byte-level tokenizer, written to <output_dir>/base)
  std::string dtype = "fp32";   // fp32, or bf16 = bf16 autocast over fp32 master weights
  std::string device = "cpu";   // cpu, cuda or cuda:N
  bool grad_checkpointing = false;  // recompute each layer in backward (less memory, ~1/3 slower)

  template <class V> void fields(V& v) {
    v("path", path);
    v("dtype", dtype);
    v("device", device);
    v("grad_checkpointing", grad_checkpointing);
  }
};

struct DataOptions {
  std::string train;            // JSONL training file
  std::string valid;            // JSONL validation file; empty = split valid_fraction off train
  double valid_fraction = 0.0;  // share of train held out for evaluation when valid is empty
  std::string format = "text";  // text | alpaca | chat (loss on responses only for alpaca/chat)
  int64_t seq_len = 512;        // tokens per row; longer documents are truncated
  bool packing = true;          // pack documents into full rows (no cross-document attention);
                                // false = one document per row, padded

  template <class V> void fields(V& v) {
    v("train", train);
    v("valid", valid);
    v("valid_fraction", valid_fraction);
    v("format", format);
    v("seq_len", seq_len);
    v("packing", packing);
  }
};

struct TrainingOptions {
  int64_t steps = 0;            // optimizer steps to run (exactly one of steps and epochs)
  double epochs = 0.0;          // passes over the training rows (may be fractional)
  int64_t micro_batch = 1;      // rows per forward/backward
  int64_t grad_accum = 1;       // micro-batches per optimizer step
  double lr = 5e-5;             // peak learning rate
  std::string lr_schedule = "cosine";  // cosine | linear | constant, each after linear warmup
  int64_t warmup_steps = 0;     // steps of linear warmup from 0 to lr
  double weight_decay = 0.0;    // AdamW decoupled decay; never on 1-D params (norms, biases)
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_eps = 1e-8;
  bool adam_fused = true;       // fused multi-tensor AdamW kernel (torch fused=True); false =
                                // per-tensor ops equal to torch foreach=False bit for bit
  double max_grad_norm = 1.0;   // clip the total L2 gradient norm to this; 0 = no clipping
  int64_t seed = 0;             // data order and preset initialization
  std::string output_dir = "runs/ftune";  // checkpoints, metrics.jsonl, config.yaml, final/
  int64_t eval_every = 0;       // evaluate every N steps (and after the last); 0 = only at the end
  bool eval_at_start = false;   // also evaluate before the first step (logged as step 0)
  int64_t save_every = 0;       // checkpoint every N steps (and after the last); 0 = never
  int64_t keep_last = 2;        // checkpoints to keep; older ones go once a newer one is complete
  std::string resume = "auto";  // auto = latest complete checkpoint in output_dir if any, whose
                                // config must match (see keeps_run_on_resume); force = the same
                                // without that check; none = start fresh; else a checkpoint dir
  int64_t threads = 0;          // CPU threads for intra-op parallelism; 0 = LibTorch's default
  int64_t stop_after = 0;       // stop after this step as if interrupted (checkpoint, no final
                                // model); 0 = run to the end. For job time limits and tests
  std::string nonfinite = "stop";  // a non-finite loss or gradient norm: stop (an error naming
                                   // the step; the update is not applied and the last checkpoint
                                   // stays) | skip (drop that step's update, log it, go on)
  int64_t max_skipped = 5;      // skip: stop with an error after this many skipped steps in a row
  bool dump_batches = false;    // debug: write every step's micro-batches to <output_dir>/batches

  template <class V> void fields(V& v) {
    v("steps", steps);
    v("epochs", epochs);
    v("micro_batch", micro_batch);
    v("grad_accum", grad_accum);
    v("lr", lr);
    v("lr_schedule", lr_schedule);
    v("warmup_steps", warmup_steps);
    v("weight_decay", weight_decay);
    v("adam_beta1", adam_beta1);
    v("adam_beta2", adam_beta2);
    v("adam_eps", adam_eps);
    v("adam_fused", adam_fused);
    v("max_grad_norm", max_grad_norm);
    v("seed", seed);
    v("output_dir", output_dir);
    v("eval_every", eval_every);
    v("eval_at_start", eval_at_start);
    v("save_every", save_every);
    v("keep_last", keep_last);
    v("resume", resume);
    v("threads", threads);
    v("stop_after", stop_after);
    v("nonfinite", nonfinite);
    v("max_skipped", max_skipped);
    v("dump_batches", dump_batches);
  }
};

struct LoggingOptions {
  int64_t log_every = 1;        // write a metrics.jsonl line (and a log line) every N steps
  std::string progress = "auto";  // auto (bar on a terminal, lines otherwise) | bar | lines
  double peak_flops = 0.0;      // FLOP/s that MFU is relative to; 0 = measure a GEMM at start

  template <class V> void fields(V& v) {
    v("log_every", log_every);
    v("progress", progress);
    v("peak_flops", peak_flops);
  }
};

// LoRA adapters on a frozen base (PEFT's defaults). lora::LoraOptions is built from this.
struct LoraSection {
  int64_t r = 8;                // rank
  double alpha = 8;             // scale numerator (PEFT's lora_alpha): scale alpha / r
  double dropout = 0;           // dropout on the adapter input while training
  std::vector<std::string> targets = {"q_proj", "v_proj"};  // module names, or all-linear
  bool rslora = false;          // scale alpha / sqrt(r)

  template <class V> void fields(V& v) {
    v("r", r);
    v("alpha", alpha);
    v("dropout", dropout);
    v("targets", targets);
    v("rslora", rslora);
  }
};

// QLoRA's frozen base: the decoder's linear weights quantized at load time (needs lora).
struct QuantSection {
  std::string type = "nf4";        // nf4 (NormalFloat4, bitsandbytes' layout)
  bool double_quant = true;        // quantize the absmax too
  int64_t blocksize = 64;          // weights per absmax
  std::string compute_dtype = "bf16";  // bf16 | fp32: what weights are dequantized to

  template <class V> void fields(V& v) {
    v("type", type);
    v("double_quant", double_quant);
    v("blocksize", blocksize);
    v("compute_dtype", compute_dtype);
  }
};

// How the processes of a launched run (`ftune launch`, torchrun, SLURM) share the work.
struct ParallelOptions {
  std::string strategy = "auto";  // auto (ddp when launched with several processes, else none) |
                                  // none (one process) | ddp (replicas, gradients all-reduced) |
                                  // zero1 / zero2 (replicas; optimizer state, and for zero2 the
                                  // gradients, sharded across ranks) | fsdp (alias
                                  // zero3: parameters sharded too, gathered unit by unit) |
                                  // model_parallel (one process; consecutive layers on the
                                  // devices of parallel.devices) | pipeline (parallel.pp
                                  // stages on as many ranks, x data-parallel replicas)
  std::string offload = "none";   // none | optimizer: zero1/zero2/fsdp keep the fp32 master
                                  // shard and its AdamW state in CPU memory, stepped there
  std::vector<std::string> devices;  // model_parallel: one device per stage, in layer order
                                     // ([cuda:0, cuda:1]; repeated cpu entries for tests); the
                                     // layers split into blocks of balanced parameter counts
  std::vector<int64_t> split;        // model_parallel: the first layer of each stage and the
                                     // layer count ([0, 12, 22] for 22 layers on 2 devices);
                                     // empty = balanced
  int64_t pp = 0;                 // pipeline: stages (>= 2); world size = pp x dp, and each
                                  // stage's dp replicas run DDP among themselves
  std::string schedule = "1f1b";  // pipeline: naive | gpipe | 1f1b
  int64_t micro_batches = 0;      // pipeline: micro-batches per pipeline round (0 =
                                  // training.grad_accum, one round per optimizer step);
                                  // grad_accum must be a multiple of it
  double bucket_mb = 25;          // DDP: gradient MiB per all-reduce bucket
  double timeout_s = 300;         // rendezvous and every collective; a rank that waits longer
                                  // fails, naming the collective and the ranks behind
  template <class V> void fields(V& v) {
    v("strategy", strategy);
    v("offload", offload);
    v("devices", devices);
    v("split", split);
    v("pp", pp);
    v("schedule", schedule);
    v("micro_batches", micro_batches);
    v("bucket_mb", bucket_mb);
    v("timeout_s", timeout_s);
  }
};

struct TrainConfig {
  ModelOptions model;
  DataOptions data;
  TrainingOptions training;
  LoggingOptions logging;
  ParallelOptions parallel;
  std::optional<LoraSection> lora;    // present = LoRA: the base is frozen, adapters train
  std::optional<QuantSection> quant;  // present = the frozen base is 4-bit (QLoRA)

  std::string file;  // the YAML file it came from ("" when built in code)
  Origins origins;   // "section.key" -> "<file>:<line>" or "--set ..."

  // Checks every value and the cross-field rules; errors are "<origin>: section.key: ...".
  void validate() const;
  // The resolved config as YAML (every key, defaults included, but only the one of training.steps
  // and training.epochs that is set), readable again by load_train_config.
  std::string to_yaml() const;
  // "section.key" -> value text, for every key.
  std::map<std::string, std::string> flatten() const;
  // "<file>:<line>" (or the --set) where `key` ("section.key") was given, else the file name.
  std::string where(const std::string& key) const;
};

struct ConfigChange {
  std::string key, before, after;  // "section.key" and the two values as text
};
// The keys whose values differ, in key order; a key of an absent section reads "(none)".
std::vector<ConfigChange> diff_configs(const TrainConfig& before, const TrainConfig& after);
// Whether changing `key` between a checkpoint and its resumption keeps it the same run (logging,
// eval/save cadence, output place, threads, device). training.steps/epochs are judged by the
// caller (raising them is fine, going below the checkpoint's step is not).
bool keeps_run_on_resume(const std::string& key);

// Reads `file`, applies `overrides` ("section.key=value", in order) and parses every section.
// Does not validate (callers call validate() once everything is known).
TrainConfig load_train_config(const std::filesystem::path& file,
                              const std::vector<std::string>& overrides = {});

// The same from YAML text (`origin` names it in errors); for tests.
TrainConfig parse_train_config(const std::string& yaml, const std::string& origin,
                               const std::vector<std::string>& overrides = {});

}  // namespace ftune::config
