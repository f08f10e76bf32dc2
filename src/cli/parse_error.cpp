// CLI11 parse errors as ftune error lines; see parse_error.h.
#include "cli/parse_error.h"

#include <algorithm>
#include <regex>
#include <sstream>
#include <vector>

namespace ftune::cli {
namespace {

// The deepest named subcommand that was parsed ("bench forward"), or the root.
const CLI::App* deepest_subcommand(const CLI::App& app, std::string* path) {
  const CLI::App* cur = &app;
  for (;;) {
    const CLI::App* next = nullptr;
    for (const CLI::App* s : cur->get_subcommands()) {
      if (!s->get_name().empty()) next = s;
    }
    if (next == nullptr) return cur;
    *path += (path->empty() ? "" : " ") + next->get_name();
    cur = next;
  }
}

std::string subcommand_list(const CLI::App& app) {
  std::string out;
  for (const CLI::App* s : app.get_subcommands(
           [](const CLI::App* s) { return !s->get_name().empty(); })) {
    out += (out.empty() ? "" : ", ") + s->get_name();
  }
  return out;
}

std::vector<std::string> split_words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// "--a,--b" (CLI11's option list of a group) -> "--a, --b".
std::string option_list(const std::string& s) {
  std::string out;
  for (char c : s) out += c == ',' ? std::string(", ") : std::string(1, c);
  return out;
}

std::string after(const std::string& s, const std::string& marker) {
  const auto i = s.find(marker);
  return i == std::string::npos ? "" : s.substr(i + marker.size());
}

std::string describe(const CLI::ParseError& e, int argc, const char* const* argv,
                     const std::string& sub, const CLI::App& app) {
  const std::string msg = e.what();
  const std::string prefix = sub.empty() ? "" : sub + ": ";
  const std::string help = "see ftune " + (sub.empty() ? "" : sub + " ") + "--help";
  std::smatch m;

  const bool no_subcommand = dynamic_cast<const CLI::RequiredError*>(&e) != nullptr &&
                             (msg.rfind("A subcommand", 0) == 0 ||
                              msg.find("subcommands") != std::string::npos);
  // CLI11 checks required options and subcommands before it reports leftovers, but a typo is the
  // likelier cause: "ftune frob" and "ftune eval --txt x" should name frob and --txt.
  const bool required = dynamic_cast<const CLI::RequiredError*>(&e) != nullptr;
  const std::vector<std::string> leftover = app.remaining(true);
  if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr || (required && !leftover.empty())) {
    // CLI11 lists the extras in reverse; report the first one on the command line.
    std::vector<std::string> extras =
        required ? leftover : split_words(after(msg, "expected: "));
    std::string first = extras.empty() ? "" : extras.back();
    for (int i = 1; i < argc; ++i) {
      if (std::find(extras.begin(), extras.end(), argv[i]) != extras.end()) {
        first = argv[i];
        break;
      }
    }
    if (!first.empty() && first[0] == '-') {
      return prefix + first.substr(0, first.find('=')) + ": unknown option (" + help + ")";
    }
    // A command with subcommands of its own (bench) names the word as an unknown subcommand.
    const bool has_subcommands =
        !app.get_subcommands([](const CLI::App*) { return true; }).empty();
    if (sub.empty() || no_subcommand || has_subcommands) {
      return prefix + first + ": unknown subcommand (expected one of " + subcommand_list(app) + ")";
    }
    return prefix + first + ": unexpected argument (" + sub + " takes only --options; " + help +
           ")";
  }
  if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr) {
    if (no_subcommand) {
      return prefix + "expected a subcommand, one of " + subcommand_list(app) + " (" + help + ")";
    }
    if (std::regex_search(msg, m, std::regex(R"(\[(.*)\])"))) {
      return prefix + option_list(m[1]) + ": expected exactly one of these options";
    }
    const std::string name = msg.substr(0, msg.find(" is required"));
    const CLI::Option* opt = app.get_option_no_throw(name);
    const std::string desc = opt != nullptr ? opt->get_description() : "";
    return prefix + name + ": required" + (desc.empty() ? "" : " (" + desc + ")");
  }
  if (dynamic_cast<const CLI::ArgumentMismatch*>(&e) != nullptr &&
      std::regex_search(msg, m, std::regex(R"(^(\S+): \d+ required (\S+) missing)"))) {
    return prefix + m[1].str() + ": expected a value (" + m[2].str() + ")";
  }
  if (dynamic_cast<const CLI::ArgumentMismatch*>(&e) != nullptr &&
      std::regex_search(msg, m, std::regex(R"(^(\S+): At Most 1 required but received (\d+))"))) {
    return prefix + m[1].str() + ": given " + m[2].str() + " times, expected at most once";
  }
  if (dynamic_cast<const CLI::ConversionError*>(&e) != nullptr) {
    if (std::regex_search(msg, m, std::regex(R"(^Could not convert: (\S+) = (.*)$)"))) {
      const CLI::Option* opt = app.get_option_no_throw(m[1].str());
      if (opt != nullptr && opt->get_expected_min() == 0) {
        return prefix + m[1].str() + ": is a flag; expected no value, got \"" + m[2].str() + "\"";
      }
      const std::string type = opt != nullptr ? opt->get_type_name() : "";
      return prefix + m[1].str() + ": expected " + (type.empty() ? "a value" : type) + ", got \"" +
             m[2].str() + "\"";
    }
    if (std::regex_search(msg, m, std::regex(R"(^(\S+): (Should be true/false|too many inputs))"))) {
      return prefix + m[1].str() + ": is a flag and takes no value";
    }
  }
  if (dynamic_cast<const CLI::ExcludesError*>(&e) != nullptr &&
      std::regex_search(msg, m, std::regex(R"(^(\S+) excludes (\S+)$)"))) {
    return prefix + m[1].str() + ": cannot be combined with " + m[2].str();
  }
  if (dynamic_cast<const CLI::RequiresError*>(&e) != nullptr &&
      std::regex_search(msg, m, std::regex(R"(^(\S+) requires (\S+)$)"))) {
    return prefix + m[1].str() + ": requires " + m[2].str();
  }
  // ValidationError is already "<flag>: <what was expected>" (our validators write the what).
  return prefix + msg;
}

}  // namespace

std::string describe_parse_error(const CLI::App& app, const CLI::ParseError& e, int argc,
                                 const char* const* argv) {
  std::string sub;
  const CLI::App* deepest = deepest_subcommand(app, &sub);
  std::string line = describe(e, argc, argv, sub, *deepest);
  // One line, whatever CLI11 put in its message.
  std::replace(line.begin(), line.end(), '\n', ' ');
  return line;
}

}  // namespace ftune::cli
