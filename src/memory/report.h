// What `ftune memory` prints: the estimate as a readable table (with the formula of each ZeRO term)
// or as JSON for scripts, the --fit recommendation with the `ftune train` line that runs it, and
// the byte-size parsing of --gpu-mem. Sizes print in GB = 10^9 bytes, as --gpu-mem reads them.
// Defines ModelRef, parse_size(), format_gb(), breakdown_json(), estimate_json(), estimate_table(), fit_json(),
// fit_text().
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "memory/estimate.h"
#include "memory/fit.h"

namespace ftune::memory {

// The model as the user named it: a preset name, or the path of a dir or config.json.
struct ModelRef {
  std::string name;
  bool preset = false;
};

// "80GB", "80 GB", "24GiB", "81920MiB", "80e9", "1.5TB" -> bytes (GB = 10^9, GiB = 2^30; a bare
// number is bytes). Throws "<where>: expected a size such as 80GB, 24GiB or 81920MiB, got ...".
int64_t parse_size(const std::string& text, const std::string& where);
std::string format_gb(int64_t bytes);  // "12.34"

// One rank's breakdown by component (the keys of `ftune memory --json`'s "rank" object).
nlohmann::json breakdown_json(const Breakdown& b);

// `gpu_mem` 0 = no fit verdict.
nlohmann::json estimate_json(const model::LlamaConfig& c, const ModelRef& m,
                             const EstimateOptions& o, const Estimate& e, int64_t gpu_mem);
std::string estimate_table(const model::LlamaConfig& c, const ModelRef& m,
                           const EstimateOptions& o, const Estimate& e, int64_t gpu_mem);

nlohmann::json fit_json(const model::LlamaConfig& c, const ModelRef& m, const FitOptions& f,
                        const FitResult& r);
std::string fit_text(const model::LlamaConfig& c, const ModelRef& m, const FitOptions& f,
                     const FitResult& r);

}  // namespace ftune::memory
