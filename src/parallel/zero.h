// ZeRO stages 1 and 2 (DeepSpeed's): every rank keeps the full parameters, but the optimizer
// state is split: the trainable parameters, flattened in order and padded to a multiple of the
// world size, are cut into equal contiguous shards, and rank r updates only shard r. After the
// backward the gradients are summed across ranks — all-reduced (stage 1) or reduce-scattered so
// each rank receives only its shard's sum (stage 2; it then drops the full gradients) — the
// gradient norm is reduced from the shards, each rank steps its shard, and the updated shards are
// all-gathered back into every replica. Per rank: AdamW state 8 Psi / n bytes instead of 8 Psi;
// per step an all-reduce (or reduce-scatter) of the gradients plus an all-gather of the params.
// With offload the pieces (fp32 master shard) and their gradients live in CPU memory, where the
// optimizer (optim::cpu_adamw_step) updates them; on a CPU device only the kernel changes.
// Defines ZeroShard.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "parallel/ddp.h"
#include "parallel/process_group.h"

namespace ftune::parallel {

class ZeroShard {
 public:
  // `params`: the trainable parameters (identical on every rank; rank 0's are broadcast first).
  // stage 1 or 2; offload: the pieces are kept in (pinned) CPU memory.
  ZeroShard(ProcessGroup& group, NamedParams params, int stage, bool offload = false);

  // This rank's pieces of the flat parameter space, one leaf tensor per parameter that overlaps
  // the shard, named like that parameter (1-D; their .grad() is set by reduce_gradients). Build
  // the optimizer over these, with decays() as its weight-decay flags.
  const NamedParams& pieces() const { return pieces_; }
  std::vector<bool> decays() const;  // per piece: whether its parameter has dim >= 2
  // Piece k holds flat elements [piece_offset(k), + its numel) of parameter piece_param(k)
  // (what a sharded checkpoint records).
  int64_t piece_offset(size_t k) const { return layout_[k].param_offset; }
  const at::Tensor& piece_param(size_t k) const { return params_[layout_[k].param].second; }

  // Sums the gradients of every rank and hands this rank its shard's sum as the pieces'
  // gradients; the parameters' full gradients are dropped.
  void reduce_gradients();
  // The L2 norm of the whole gradient, from the shards (fp32 scalar, as clipping needs it).
  at::Tensor global_grad_norm();
  // After the pieces were updated: every replica gets every shard's new values.
  void gather_parameters();

 private:
  struct Piece {
    size_t param;          // index into params_
    int64_t param_offset;  // first element of the parameter in this piece
    int64_t shard_offset;  // where it sits in this rank's shard
    int64_t length;
  };
  ProcessGroup& group_;
  NamedParams params_;
  int stage_;
  int64_t shard_ = 0;  // elements per rank's shard, padding included
  std::vector<int64_t> offsets_;  // each parameter's first element in the flat space
  std::vector<Piece> layout_;
  NamedParams pieces_;
};

}  // namespace ftune::parallel
