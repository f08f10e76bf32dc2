// Subcommand registry for the `ftune` binary. Each subcommand lives in its own cmd_<name>.cpp
// and exposes one register function that adds a CLI11 subcommand whose callback runs it.
// Callbacks throw ftune::Error on bad input; main() turns that into one line and exit code 1.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

namespace ftune::parallel {
struct LaunchOptions;
}

namespace ftune::cli {

void register_tokenize(CLI::App& app);
void register_init_model(CLI::App& app);
void register_eval(CLI::App& app);
void register_generate(CLI::App& app);
void register_bench(CLI::App& app);
void register_train(CLI::App& app);
void register_convert(CLI::App& app);
void register_merge(CLI::App& app);
void register_quantize(CLI::App& app);
void register_launch(CLI::App& app);
void register_memory(CLI::App& app);
void register_plan(CLI::App& app);
// The strategy benchmark's options and callback on `ftune bench` (cmd_bench_strategies.cpp).
void register_bench_strategies(CLI::App* bench);

// Runs `command` in workers (parallel::launch) and, when one failed or a signal stopped them,
// ends this process with the launcher's exit code. Shared by `launch` and `train --nproc`.
void run_workers(const parallel::LaunchOptions& opts, const std::vector<std::string>& command);

}  // namespace ftune::cli
