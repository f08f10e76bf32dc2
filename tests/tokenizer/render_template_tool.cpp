// Test driver for tests/python/test_chat_template.py: renders many chat-template cases in one
// process so the comparison with transformers' jinja2 environment stays fast.
// Input: a JSON file [{"template": "...", "context": {...}}, ...] (key order kept, as Python's
// dicts keep it). Output, to stdout or the second argument: a JSON array holding, per case, the
// rendered string or {"error": "<ftune::Error message>"}.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <exception>
#include <iostream>

#include "core/error.h"
#include "core/fs.h"
#include "tokenizer/chat_template.h"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: render_template_tool CASES.json [OUT.json]\n");
    return 2;
  }
  try {
    const auto cases = nlohmann::ordered_json::parse(ftune::read_file(argv[1]));
    FTUNE_CHECK(cases.is_array(), argv[1], ": expected a JSON array of cases");
    nlohmann::ordered_json results = nlohmann::ordered_json::array();
    for (const auto& c : cases) {
      try {
        results.push_back(ftune::tok::render_chat_template(
            c.at("template").get<std::string>(), c.value("context", nlohmann::ordered_json::object())));
      } catch (const ftune::Error& e) {
        results.push_back({{"error", e.what()}});
      }
    }
    const std::string text = results.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (argc == 3) {
      ftune::write_file_atomic(argv[2], text);
    } else {
      std::cout << text << "\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "render_template_tool: %s\n", e.what());
    return 1;
  }
  return 0;
}
