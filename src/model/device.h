// The one parser of device names, shared by every --device flag and the YAML model.device key.
// Syntax is strict ("cpu", "cuda", "cuda:N" with N a plain non-negative integer) so a typo such
// as "cuda:1x" or "gpu" is an error instead of a silent fallback. Availability is checked here
// too, so a CPU-only build fails with the flag named rather than deep inside LibTorch.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace ftune::model {

// Parses `s`; `origin` names where it came from ("eval: --device", "cfg.yaml:3: model.device")
// and prefixes every error. "cuda" means cuda:0.
at::Device parse_device(const std::string& s, const std::string& origin);

}  // namespace ftune::model
