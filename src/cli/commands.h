// Subcommand registry for the `ftune` binary. Each subcommand lives in its own cmd_<name>.cpp
// and exposes one register function that adds a CLI11 subcommand whose callback runs it.
// Callbacks throw ftune::Error on bad input; main() turns that into one line and exit code 1.
#pragma once

#include <CLI/CLI.hpp>

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

}  // namespace ftune::cli
