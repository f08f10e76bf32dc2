// Sharded training checkpoints, for strategies whose optimizer holds pieces of the parameters
// (Strategy::piece_layout(): ZeRO, FSDP). Every rank writes its own pieces and their AdamW state;
// nothing is gathered and no rank reads the model's tensors (FSDP's have no storage between uses).
// Loading reshards: each rank reads, for each of its pieces, the overlapping ranges of whichever
// rank files hold them, so any saved world size resumes at any other, a non-sharded strategy
// (whole parameters) resumes from a sharded checkpoint, and a sharded strategy resumes from a
// consolidated one (checkpoint.h) by flat range. Layout of checkpoints/step-N/:
//   shards/rank-<r>-of-<n>.safetensors  "<name>", "<name>.exp_avg", "<name>.exp_avg_sq" (1-D, the
//                                       piece's elements) and "<name>.step" (int64 scalar)
//   shards/index.json                   world size, strategy; per name its full shape, dtype and,
//                                       per rank file, the [offset, length) of the flat parameter
//   rng.safetensors, trainer_state.json, tokenizer files, checksums.json (written last, by rank
//                                       0: every file, each rank's shard included) — as
//                                       checkpoint.h.
// Not an HF model or PEFT adapter dir: eval/generate take <output_dir>/final.
// Defines SavedRange, RangeCopy, plan_range_reads, save_sharded_checkpoint,
// is_sharded_checkpoint, load_checkpoint_pieces.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "optim/adamw.h"
#include "train/checkpoint.h"
#include "train/strategy.h"

namespace ftune::train {

// Elements [offset, offset + length) of a flat parameter, stored whole in source `source`.
struct SavedRange {
  int source = 0;
  int64_t offset = 0;
  int64_t length = 0;
};
// Copy `length` elements from source `source` (starting at its element `src_offset`) to the
// wanted range's element `dst_offset`.
struct RangeCopy {
  int source = 0;
  int64_t src_offset = 0;
  int64_t dst_offset = 0;
  int64_t length = 0;
};

// The copies that fill elements [offset, offset + length) of a flat parameter from `saved`
// (disjoint ranges, any order), in ascending dst_offset. An element no saved range holds is an
// error: "<what>: elements [a, b) are in no shard".
std::vector<RangeCopy> plan_range_reads(const std::vector<SavedRange>& saved, int64_t offset,
                                        int64_t length, const std::string& what);

// Whether `dir` is a sharded checkpoint (holds shards/index.json).
bool is_sharded_checkpoint(const std::filesystem::path& dir);

// Writes checkpoints/step-<state.step> as a sharded checkpoint; every rank calls it. `layout` is
// strategy.piece_layout() (opt.params() order). Each rank writes its shard file into
// checkpoints/.tmp-step-<N> (a filesystem all ranks share), then waits at a barrier (at most
// wait_s; 0 = the group's timeout); rank 0 then writes shards/index.json, the tokenizer files of
// `tokenizer_dir`, the RNG state of `device`, trainer_state.json (meta + state), checksums.json
// (reading every rank's file back: one pass, at page-cache speed on one node) and renames the
// dir into place, pruning to keep_last. A rank killed anywhere before that leaves only the temp
// dir (removed at the next start). Test seam: crash_point("checkpoint:shard_written") after a
// rank's file is complete. Returns the checkpoint's dir (complete on rank 0 only).
std::filesystem::path save_sharded_checkpoint(const std::filesystem::path& output_dir,
                                              const std::vector<PieceInfo>& layout,
                                              const optim::AdamW& opt, const TrainState& state,
                                              int64_t keep_last, const nlohmann::json& meta,
                                              const std::filesystem::path& tokenizer_dir,
                                              Strategy& strategy, at::Device device,
                                              double wait_s = 0);

// Restores a checkpoint (sharded, or consolidated: model.safetensors or adapter_model.safetensors
// plus optimizer.safetensors) into opt.params() and the optimizer state, piece by piece as
// `layout` says (empty = each of opt.params() is a whole parameter, and then the checkpoint must
// hold exactly those parameters), plus the CPU (and `device`'s) RNG state. Reads only the ranges
// the pieces cover; never touches the model. The caller runs strategy.pieces_loaded() after.
// Errors name the checkpoint file and the parameter.
TrainState load_checkpoint_pieces(const std::filesystem::path& dir, std::vector<PieceInfo> layout,
                                  optim::AdamW& opt, at::Device device);

}  // namespace ftune::train
