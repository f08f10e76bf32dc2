// Metrics file, progress display, memory and FLOP accounting; see metrics.h.
#include "train/metrics.h"

#include <ATen/core/grad_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/DeviceAccelerator.h>
#include <sys/resource.h>

#include <cstdio>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "core/fs.h"

namespace ftune::train {
namespace fs = std::filesystem;

MetricsLog::MetricsLog(const fs::path& path, int64_t keep_through_step, bool enabled)
    : path_(path) {
  if (!enabled) return;
  std::string kept;
  if (keep_through_step > 0 && fs::exists(path)) {
    std::istringstream in(read_file(path));
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
          j["step"].get<int64_t>() <= keep_through_step) {
        kept += line + "\n";
      }
    }
  }
  write_file_atomic(path, kept);
  out_.open(path, std::ios::app);
  FTUNE_CHECK(out_, path.string(), ": cannot open for appending");
}

void MetricsLog::write(const nlohmann::json& record) {
  if (!out_.is_open()) return;
  out_ << record.dump() << "\n";
  out_.flush();
}

int64_t peak_memory_bytes(at::Device device) {
  if (device.is_cuda()) {
    auto stats = at::accelerator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return stats.allocated_bytes[0].peak;  // StatType::AGGREGATE
  }
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

double measure_matmul_flops(at::Device device, at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  const int64_t n = device.is_cuda() ? 8192 : 1024;
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  // A private generator: the measurement must not move the global RNG a run checkpoints.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  at::Tensor a = at::randn({n, n}, gen, at::TensorOptions().dtype(at::kFloat)).to(opts);
  at::Tensor b = at::randn({n, n}, gen, at::TensorOptions().dtype(at::kFloat)).to(opts);
  at::Tensor c = at::mm(a, b);  // warm-up
  auto sync = [&] {
    if (device.is_cuda()) at::accelerator::synchronizeDevice(device.index() < 0 ? 0 : device.index());
  };
  sync();
  int64_t iters = 0;
  auto t0 = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < 0.2 || iters < 3) {
    at::mm_out(c, a, b);
    ++iters;
    sync();
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return 2.0 * n * n * n * iters / elapsed;
}

double train_flops_per_token(const model::LlamaConfig& c, int64_t seq_len) {
  double params = static_cast<double>(c.num_parameters());
  if (!c.tie_word_embeddings) params -= static_cast<double>(c.vocab_size * c.hidden_size);
  const double attn = 12.0 * c.num_hidden_layers * c.hidden_size * static_cast<double>(seq_len);
  return 6.0 * params + attn;
}

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e8) return "--:--";
  auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%02lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  }
  return buf;
}

Progress::Progress(int64_t total_steps, int64_t start_step, bool bar)
    : total_(total_steps), start_(start_step), bar_(bar), t0_(std::chrono::steady_clock::now()) {}

Progress::~Progress() { finish(); }

double Progress::eta(int64_t step) const {
  const int64_t done = step - start_;
  if (done <= 0) return -1;
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  return el / static_cast<double>(done) * static_cast<double>(total_ - step);
}

void Progress::update(int64_t step, const std::string& line, bool log_step) {
  const std::string eta_s = format_duration(eta(step));
  if (bar_) {
    constexpr int kWidth = 24;
    const int filled = total_ > 0 ? static_cast<int>(kWidth * step / total_) : kWidth;
    std::string bar(filled, '#');
    bar += std::string(kWidth - filled, '.');
    std::fprintf(stderr, "\r\033[2Kstep %lld/%lld [%s] %s ETA %s", static_cast<long long>(step),
                 static_cast<long long>(total_), bar.c_str(), line.c_str(), eta_s.c_str());
    std::fflush(stderr);
    bar_drawn_ = true;
  } else if (log_step) {
    std::fprintf(stderr, "step %lld/%lld %s eta %s\n", static_cast<long long>(step),
                 static_cast<long long>(total_), line.c_str(), eta_s.c_str());
    std::fflush(stderr);
  }
}

void Progress::message(const std::string& line) {
  if (bar_ && bar_drawn_) std::fprintf(stderr, "\r\033[2K");
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  bar_drawn_ = false;
}

void Progress::finish() {
  if (bar_ && bar_drawn_) {
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
    bar_drawn_ = false;
  }
}

std::string format_number(const char* printf_format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), printf_format, v);
  return buf;
}

}  // namespace ftune::train
