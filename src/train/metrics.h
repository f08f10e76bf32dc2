// What a run reports: metrics.jsonl (one JSON object per logged step), a progress bar with ETA
// on a terminal or plain log lines otherwise, and the numbers behind them: peak memory, the
// machine's measured GEMM rate and the model FLOPs per token that MFU divides by it.
// Defines MetricsLog, Progress, peak_memory_bytes, measure_matmul_flops, train_flops_per_token.
#pragma once

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "model/config.h"

namespace ftune::train {

// Appends one JSON line per record to <output_dir>/metrics.jsonl, flushed per line.
class MetricsLog {
 public:
  // Opens the file; keeps only lines with "step" <= keep_through_step (earlier steps of a
  // resumed run; a fresh run passes 0 and starts an empty file). A log that is not `enabled`
  // (the other ranks of a distributed run) never touches the file.
  MetricsLog(const std::filesystem::path& path, int64_t keep_through_step, bool enabled = true);
  void write(const nlohmann::json& record);
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

// Peak memory so far: max allocated bytes on a CUDA device, else the process's peak RSS.
int64_t peak_memory_bytes(at::Device device);

// FLOP/s of a square matmul on `device` in `dtype`, measured over ~0.2 s (the MFU denominator
// when logging.peak_flops is 0).
double measure_matmul_flops(at::Device device, at::ScalarType dtype);

// Training FLOPs per token: 6 * (parameters that do matmuls: all but the input embedding lookup,
// which an untied model does not multiply) + attention 12 * layers * hidden * seq_len.
double train_flops_per_token(const model::LlamaConfig& c, int64_t seq_len);

// "1:02:03" / "02:03".
std::string format_duration(double seconds);
// One number through a printf format: format_number("%.1f", 2.25) == "2.2".
std::string format_number(const char* printf_format, double v);

// Human-facing progress: a redrawn bar with ETA on a terminal, else one line per logged step.
class Progress {
 public:
  Progress(int64_t total_steps, int64_t start_step, bool bar);
  ~Progress();
  // After every step; `line` is the step's summary ("loss 2.31 lr 1.0e-04 ...").
  void update(int64_t step, const std::string& line, bool log_step);
  // A message on its own line (eval results, checkpoints), not overwritten by the bar.
  void message(const std::string& line);
  void finish();

 private:
  double eta(int64_t step) const;
  int64_t total_, start_;
  bool bar_;
  bool bar_drawn_ = false;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace ftune::train
