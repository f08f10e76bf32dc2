// ftune: one binary, many subcommands (see commands.h). Parse, run, report; one top-level catch so
// every bad input, from an unknown flag to a corrupt checkpoint, ends as a single
// "ftune: error: ..." line and exit code 1, never a crash. --help and --version exit 0.
#include <c10/util/Exception.h>

#include <csignal>
#include <cstdio>
#include <exception>

#include "cli/commands.h"
#include "cli/parse_error.h"
#include "core/error.h"

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) would kill the process in the middle of a write (SIGXFSZ);
  // ignored, the write fails with EFBIG and the writer reports it naming the file, while the
  // temp-and-rename writes leave the previous checkpoint or model as it was.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"ftune: fine-tune Llama-family models natively (full, LoRA or QLoRA; on one CPU or GPU, "
               "or data-parallel over several processes)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ftune 0.1.0");
  ftune::cli::register_tokenize(app);
  ftune::cli::register_init_model(app);
  ftune::cli::register_eval(app);
  ftune::cli::register_generate(app);
  ftune::cli::register_bench(app);
  ftune::cli::register_train(app);
  ftune::cli::register_convert(app);
  ftune::cli::register_merge(app);
  ftune::cli::register_quantize(app);
  ftune::cli::register_launch(app);
  ftune::cli::register_memory(app);
  ftune::cli::register_plan(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version
  } catch (const CLI::ParseError& e) {
    const std::string line = ftune::cli::describe_parse_error(app, e, argc, argv);
    std::fprintf(stderr, "ftune: error: %s\n", line.c_str());
    return 1;
  } catch (const ftune::Error& e) {
    std::fprintf(stderr, "ftune: error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "ftune: error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ftune: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
