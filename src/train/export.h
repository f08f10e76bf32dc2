// The trained model's export when its parameters may be sharded across ranks: every rank walks
// the model unit by unit through Strategy::for_each_unit_gathered (FSDP gathers one unit at a
// time), and rank 0 writes each unit's tensors straight into files whose headers it wrote at the
// first unit, with the dtypes the strategy exports in (io::WeightsStreamWriter /
// io::SafetensorsStreamWriter). So no rank ever holds more than
// one unit's full values, and the files are byte for byte what save_trained writes from a whole
// model. Defines save_trained_streamed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "model/llama.h"
#include "train/strategy.h"

namespace ftune::train {

// save_trained (a model dir, or PEFT's adapter dir when `m` carries LoRA adapters, with
// base_model_name_or_path = `base_model`) through `strategy`'s gathers. Every rank must call it;
// only the main rank writes into `dir`. max_shard_bytes as model::save_model.
void save_trained_streamed(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                           const std::string& base_model, Strategy& strategy,
                           int64_t max_shard_bytes = int64_t{5} << 30);

}  // namespace ftune::train
