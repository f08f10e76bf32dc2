// Turns CLI11's parse errors into ftune's error contract: one line "<subcommand>: <flag>: <what
// was expected>" (main() adds "ftune: error: " and exits 1). CLI11 reports through exception
// types and English messages; this maps each type to the flag it concerns, using the parsed
// state of the app to find the subcommand and argv to report the first offending argument.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

namespace ftune::cli {

std::string describe_parse_error(const CLI::App& app, const CLI::ParseError& e, int argc,
                                 const char* const* argv);

}  // namespace ftune::cli
