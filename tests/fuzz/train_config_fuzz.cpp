// libFuzzer target for the YAML recipe reader: the input is a `ftune train` config file. It must
// either parse and validate or throw ftune::Error; a config that validates must survive a round
// trip through to_yaml() (the resolved config ftune writes next to a run) with every key intact.
// Run: train_config_fuzz tests/fuzz/corpus/train_config tests/fuzz/seeds/train_config
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "config/train_config.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  ftune::config::TrainConfig c;
  try {
    c = ftune::config::parse_train_config(text, "fuzz.yaml");
    c.validate();
  } catch (const ftune::Error&) {
    return 0;
  }
  // The oracle: what ftune writes back is read again as the same config.
  const std::string yaml = c.to_yaml();
  try {
    const auto again = ftune::config::parse_train_config(yaml, "resolved.yaml");
    again.validate();
    if (again.flatten() != c.flatten()) {
      std::fprintf(stderr, "round trip changed the config:\n%s\n", yaml.c_str());
      std::abort();
    }
  } catch (const ftune::Error& e) {
    std::fprintf(stderr, "resolved config does not load again: %s\n%s\n", e.what(), yaml.c_str());
    std::abort();
  }
  return 0;
}
