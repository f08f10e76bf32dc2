// `ftune bench --config FILE --strategies ddp,fsdp,... --nproc N [--methods full,lora,qlora]
// [--grad-ckpt off|on|both] --out DIR`: the same model and data trained under each combination,
// one `ftune train` child per cell (a failing cell is recorded and the next one runs), at equal
// work: every cell trains the same global batch (one process and the pipeline's single replica
// accumulate N times the micro-batches of an N-rank data-parallel run). Writes summary.json,
// summary.csv and report.md; the charts come from scripts/plot_bench.py (matplotlib, run from the
// venv: ftune itself runs no Python), whose command it prints. See docs/bench.md.
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "cli/commands.h"
#include "cli/common.h"
#include "config/train_config.h"
#include "core/error.h"
#include "core/fs.h"
#include "train/metrics.h"

namespace ftune::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using train::format_number;

struct StrategyBenchArgs {
  std::string config, out, grad_ckpt = "off";
  std::vector<std::string> strategies, methods = {"full"}, sets;
  int nproc = 2;
  int64_t lora_r = 8;
};

const std::vector<std::string> kStrategies = {"single", "ddp", "zero1", "zero2", "fsdp", "pipeline"};
const std::vector<std::string> kMethods = {"full", "lora", "qlora"};

bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

struct Cell {
  std::string name, strategy, method;
  bool ckpt = false;
  int nproc = 1;
  std::vector<std::string> sets;
};

// The cells in the order they run, each with the --set lines that make it.
std::vector<Cell> plan_cells(const StrategyBenchArgs& a, const config::TrainConfig& base) {
  std::vector<bool> ckpts;
  if (a.grad_ckpt != "on") ckpts.push_back(false);
  if (a.grad_ckpt != "off") ckpts.push_back(true);
  std::vector<Cell> cells;
  for (const auto& s : a.strategies) {
    for (const auto& m : a.methods) {
      for (bool ck : ckpts) {
        Cell c{s + "-" + m + (ck ? "-ckpt" : ""), s, m, ck, s == "single" ? 1 : a.nproc, a.sets};
        const fs::path dir = fs::path(a.out) / "runs" / c.name;
        c.sets.push_back("training.output_dir=" + dir.string());
        c.sets.push_back("training.resume=none");
        c.sets.push_back(std::string("model.grad_checkpointing=") + (ck ? "true" : "false"));
        // Equal work: the global batch of N data-parallel ranks.
        const int64_t accum = base.training.grad_accum;
        if (s == "single") {
          c.sets.push_back("parallel.strategy=none");
          c.sets.push_back("training.grad_accum=" + std::to_string(accum * a.nproc));
        } else if (s == "pipeline") {
          c.sets.push_back("parallel.strategy=pipeline");
          c.sets.push_back("parallel.pp=" + std::to_string(a.nproc));
          c.sets.push_back("training.grad_accum=" + std::to_string(accum * a.nproc));
        } else {
          c.sets.push_back("parallel.strategy=" + s);
        }
        if (m != "full") c.sets.push_back("lora.r=" + std::to_string(a.lora_r));
        if (m == "qlora") c.sets.push_back("quant.type=nf4");
        cells.push_back(std::move(c));
      }
    }
  }
  return cells;
}

// Runs this binary with `args`, stdout and stderr to `log`; returns the exit status.
int run_child(const std::vector<std::string>& args, const fs::path& log) {
  std::vector<char*> argv;
  std::string self = "ftune";
  argv.push_back(self.data());
  std::vector<std::string> copy = args;
  for (auto& s : copy) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::cout << std::flush;
  const pid_t pid = ::fork();
  FTUNE_CHECK(pid >= 0, "bench: fork failed: ", std::strerror(errno));
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      ::dup2(fd, STDOUT_FILENO);
      ::dup2(fd, STDERR_FILENO);
      ::close(fd);
    }
    ::execv("/proc/self/exe", argv.data());
    std::_Exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

// The last line of `log` that says "error" (what a failed cell reports), or its last line.
std::string failure_line(const fs::path& log) {
  std::ifstream in(log);
  std::string line, last, error;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    last = line;
    if (line.find("error") != std::string::npos) error = line;
  }
  return error.empty() ? last : error;
}

std::vector<json> read_jsonl(const fs::path& p) {
  std::vector<json> rows;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) rows.push_back(json::parse(line, nullptr, false));
  }
  return rows;
}

// One cell's outcome from its output dir: throughput and communication from the last metrics
// line, the loss, and the measured and predicted memory (rank 0).
json cell_result(const Cell& c, int status, double wall_s, const fs::path& log) {
  json r = {{"name", c.name},     {"strategy", c.strategy}, {"method", c.method},
            {"grad_ckpt", c.ckpt}, {"nproc", c.nproc},       {"wall_s", wall_s},
            {"log", log.string()}, {"ok", status == 0}};
  const fs::path dir = log.parent_path() / c.name;
  r["output_dir"] = dir.string();
  if (status != 0) {
    r["error"] = failure_line(log);
    return r;
  }
  const std::vector<json> rows = read_jsonl(dir / "metrics.jsonl");
  json last = json::object();
  for (const json& row : rows) {
    if (row.is_object() && row.contains("tokens_per_s")) last = row;
  }
  r["steps"] = last.value("step", 0);
  r["tokens_per_s"] = last.value("tokens_per_s", 0.0);
  r["final_loss"] = last.value("loss", 0.0);
  r["mfu"] = last.value("mfu", 0.0);
  r["comm_exposed_frac"] = last.value("comm_exposed_frac", 0.0);
  int64_t comm = 0;
  if (last.contains("comm_bytes") && last["comm_bytes"].is_object()) {
    for (const auto& [k, v] : last["comm_bytes"].items()) comm += v.get<int64_t>();
  }
  r["comm_bytes_per_step"] = comm;
  std::ifstream mf(dir / "memory.json");
  const json mem = json::parse(mf, nullptr, false);
  if (mem.is_object()) {
    const int64_t measured = mem["measured"].value("step_peak_tensor_bytes", int64_t{0});
    const int64_t predicted = mem["predicted"].value("total", int64_t{0});
    r["measured_peak_bytes"] = measured;
    r["predicted_peak_bytes"] = predicted;
    r["memory_ratio"] = predicted > 0 ? static_cast<double>(measured) / predicted : 0.0;
    r["predicted_breakdown"] = mem["predicted"].value("rank", json::object());
  }
  return r;
}

void write_summary(const StrategyBenchArgs& a, const std::vector<json>& results) {
  const fs::path out = a.out;
  const json summary = {{"config", a.config},   {"nproc", a.nproc},   {"sets", a.sets},
                        {"strategies", a.strategies}, {"methods", a.methods},
                        {"grad_ckpt", a.grad_ckpt},   {"runs", results}};
  write_file_atomic(out / "summary.json", summary.dump(2) + "\n");

  std::ostringstream csv;
  csv.precision(12);
  csv << "name,strategy,method,grad_ckpt,nproc,ok,tokens_per_s,final_loss,mfu,comm_exposed_frac,"
         "comm_bytes_per_step,measured_peak_bytes,predicted_peak_bytes,memory_ratio,wall_s\n";
  for (const json& r : results) {
    csv << r["name"].get<std::string>() << "," << r["strategy"].get<std::string>() << ","
        << r["method"].get<std::string>() << "," << (r["grad_ckpt"].get<bool>() ? 1 : 0) << ","
        << r["nproc"].get<int>() << "," << (r["ok"].get<bool>() ? 1 : 0) << ","
        << r.value("tokens_per_s", 0.0) << "," << r.value("final_loss", 0.0) << ","
        << r.value("mfu", 0.0) << "," << r.value("comm_exposed_frac", 0.0) << ","
        << r.value("comm_bytes_per_step", int64_t{0}) << ","
        << r.value("measured_peak_bytes", int64_t{0}) << ","
        << r.value("predicted_peak_bytes", int64_t{0}) << "," << r.value("memory_ratio", 0.0)
        << "," << r["wall_s"].get<double>() << "\n";
  }
  write_file_atomic(out / "summary.csv", csv.str());

  std::ostringstream md;
  md << "# Strategy benchmark\n\n`ftune bench --config " << a.config << " --strategies "
     << joined(a.strategies) << " --nproc " << a.nproc << " --methods " << joined(a.methods)
     << " --grad-ckpt " << a.grad_ckpt << "`";
  for (const auto& s : a.sets) md << " `--set " << s << "`";
  md << "\n\nEvery cell trains the same global batch (one process and the pipeline accumulate "
        "N times the micro-batches). Memory is rank 0's largest step peak of live tensor bytes "
        "against `ftune memory`'s prediction for the cell's config.\n\n";
  md << "| run | tokens/s | final loss | exposed comm | comm MB/step | peak MB | predicted MB | "
        "measured/predicted |\n|---|---|---|---|---|---|---|---|\n";
  for (const json& r : results) {
    md << "| " << r["name"].get<std::string>() << " | ";
    if (!r["ok"].get<bool>()) {
      md << "failed: " << r.value("error", std::string()) << " | | | | | | |\n";
      continue;
    }
    md << format_number("%.0f", r.value("tokens_per_s", 0.0)) << " | "
       << format_number("%.4f", r.value("final_loss", 0.0))
       << " | " << format_number("%.1f%%", 100 * r.value("comm_exposed_frac", 0.0)) << " | "
       << format_number("%.2f", r.value("comm_bytes_per_step", int64_t{0}) / 1e6) << " | "
       << format_number("%.1f", r.value("measured_peak_bytes", int64_t{0}) / 1e6) << " | "
       << format_number("%.1f", r.value("predicted_peak_bytes", int64_t{0}) / 1e6) << " | "
       << format_number("%.3f", r.value("memory_ratio", 0.0)) << " |\n";
  }
  md << "\n## Charts\n\n(made by `scripts/plot_bench.py " << a.out << "`)\n\n"
     << "![tokens per second](tokens_per_s.png)\n\n"
     << "![memory, measured vs predicted](memory.png)\n\n"
     << "![loss curves](loss.png)\n\n"
     << "![exposed communication](comm_exposed.png)\n";
  write_file_atomic(out / "report.md", md.str());
}

void run_strategy_bench(const StrategyBenchArgs& a) {
  FTUNE_CHECK(!a.strategies.empty(), "bench: --strategies: expected a list such as ddp,fsdp");
  for (const auto& s : a.strategies) {
    FTUNE_CHECK(contains(kStrategies, s), "bench: --strategies: unknown strategy \"", s,
                "\" (expected ", joined(kStrategies), ")");
  }
  for (const auto& m : a.methods) {
    FTUNE_CHECK(contains(kMethods, m), "bench: --methods: unknown method \"", m, "\" (expected ",
                joined(kMethods), ")");
  }
  FTUNE_CHECK(a.grad_ckpt == "off" || a.grad_ckpt == "on" || a.grad_ckpt == "both",
              "bench: --grad-ckpt: expected off, on or both, got \"", a.grad_ckpt, "\"");
  FTUNE_CHECK(!a.out.empty(), "bench: --out: expected a directory for the results");
  // The config must load (one error line here, not one per cell); the methods add lora/quant.
  const config::TrainConfig base = config::load_train_config(a.config, a.sets);
  FTUNE_CHECK(!base.lora && !base.quant, "bench: --config: ", a.config,
              " has a lora or quant section; give a full fine-tuning config (--methods adds "
              "lora.r and quant.type per cell)");
  FTUNE_CHECK(a.nproc >= 2 || (a.strategies.size() == 1 && a.strategies[0] == "single"),
              "bench: --nproc: the distributed strategies need at least 2, got ", a.nproc);

  const std::vector<Cell> cells = plan_cells(a, base);
  fs::create_directories(fs::path(a.out) / "runs");
  std::vector<json> results;
  const auto t_all = std::chrono::steady_clock::now();
  for (size_t i = 0; i < cells.size(); ++i) {
    const Cell& c = cells[i];
    std::vector<std::string> args = {"train", "--config", a.config};
    if (c.nproc > 1) args.insert(args.end(), {"--nproc", std::to_string(c.nproc)});
    for (const auto& s : c.sets) args.insert(args.end(), {"--set", s});
    const fs::path log = fs::path(a.out) / "runs" / (c.name + ".log");
    // The bar: cells done, then the one running.
    const int width = 24, done = static_cast<int>(width * i / cells.size());
    std::fprintf(stderr, "[%s%s] %zu/%zu %s ...\n", std::string(done, '#').c_str(),
                 std::string(width - done, '.').c_str(), i + 1, cells.size(), c.name.c_str());
    const auto t0 = std::chrono::steady_clock::now();
    const int status = run_child(args, log);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    json r = cell_result(c, status, wall, log);
    if (r["ok"].get<bool>()) {
      std::fprintf(stderr, "    %s: %.0f tok/s, loss %.4f, peak %.1f MB (predicted %.1f MB), %.0f s\n",
                   c.name.c_str(), r.value("tokens_per_s", 0.0), r.value("final_loss", 0.0),
                   r.value("measured_peak_bytes", int64_t{0}) / 1e6,
                   r.value("predicted_peak_bytes", int64_t{0}) / 1e6, wall);
    } else {
      std::fprintf(stderr, "    %s: failed (exit %d): %s (log: %s)\n", c.name.c_str(), status,
                   r.value("error", std::string()).c_str(), log.c_str());
    }
    results.push_back(std::move(r));
    write_summary(a, results);  // after every cell: an interrupted bench keeps what it measured
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  int failed = 0;
  for (const json& r : results) failed += r["ok"].get<bool>() ? 0 : 1;
  std::printf("bench: %zu runs (%d failed) in %.0f s: %s/summary.json, summary.csv, report.md\n"
              "charts: .venv/bin/python scripts/plot_bench.py %s\n",
              results.size(), failed, total, a.out.c_str(), a.out.c_str());
  FTUNE_CHECK(failed == 0, "bench: ", failed, " of ", results.size(),
              " runs failed (see report.md and each run's log)");
}

}  // namespace

void register_bench_strategies(CLI::App* bench) {
  auto a = std::make_shared<StrategyBenchArgs>();
  bench->add_option("--config", a->config,
                    "Strategy benchmark: the full fine-tuning YAML config every run starts from")
      ->type_name("FILE");
  bench->add_option("--strategies", a->strategies,
                    "single, ddp, zero1, zero2, fsdp, pipeline (comma-separated)")
      ->delimiter(',')
      ->type_name("LIST");
  bench->add_option("--nproc", a->nproc, "Ranks of the distributed runs (default 2)")
      ->type_name("N")
      ->check(int_at_least(1));
  bench->add_option("--methods", a->methods, "full, lora, qlora (default full)")
      ->delimiter(',')
      ->type_name("LIST");
  bench->add_option("--lora-r", a->lora_r, "Adapter rank of the lora and qlora runs (default 8)")
      ->type_name("R")
      ->check(int_at_least(1));
  bench->add_option("--grad-ckpt", a->grad_ckpt, "off (default), on, or both");
  bench->add_option("--out", a->out, "Results directory (summary.json, summary.csv, report.md, runs/)")
      ->type_name("DIR");
  bench->add_option("--set", a->sets, "Override a config key in every run (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  bench->callback([a, bench] {
    if (!bench->get_subcommands().empty()) return;  // bench forward / bench gemm ran
    FTUNE_CHECK(!a->config.empty(), "bench: expected a subcommand (forward, gemm) or the strategy "
                "benchmark's --config FILE --strategies LIST --out DIR");
    run_strategy_bench(*a);
  });
}

}  // namespace ftune::cli
