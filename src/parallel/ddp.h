// Data parallelism (DDP): every rank holds a full replica and trains on its own rows; after the
// last micro-batch's backward the gradients are summed across ranks, so all replicas take the same
// step. The loss is normalized by the GLOBAL target count, which makes that sum the gradient of
// one process over the global batch (no division by the world size). Gradients are packed into
// buckets (~bucket_bytes, in reverse parameter order: the order backward produces them) and each
// bucket's all-reduce starts from a post-accumulate-grad hook as soon as its last gradient is
// final, overlapping communication with the rest of the backward. Buckets are launched strictly in
// order, so every rank issues the same collectives in the same sequence.
// Defines DdpOptions, Ddp, apply_ddp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel/process_group.h"

namespace ftune::parallel {

using NamedParams = std::vector<std::pair<std::string, at::Tensor>>;

struct DdpOptions {
  int64_t bucket_bytes = 25 << 20;  // gradient bytes per all-reduce bucket (parallel.bucket_mb)
};

class Ddp {
 public:
  // Checks that every rank has the same parameter names and shapes (one line naming the first
  // that differs), broadcasts rank 0's values into every replica, builds the buckets and
  // registers the hooks. `params` are the trainable parameters (LoRA: the adapters only).
  Ddp(ProcessGroup& group, NamedParams params, DdpOptions options);
  ~Ddp();  // removes the hooks
  Ddp(const Ddp&) = delete;
  Ddp& operator=(const Ddp&) = delete;

  // Whether the coming backward is the last of the step (its gradients get all-reduced) or an
  // accumulation micro-step (no communication at all).
  void set_sync(bool sync);
  // After the last backward: launches any bucket whose gradients never arrived (an unused
  // parameter counts as zero), waits for all of them and writes the summed gradients back.
  void finish();

  int64_t gradient_bytes() const;  // payload all-reduced per optimizer step

 struct Impl;  // public so the autograd hooks (ddp.cpp) can reach it

 private:
  std::unique_ptr<Impl> impl_;
};

// Checks that every rank has the same parameter names and shapes (one line naming the first
// that differs) and broadcasts rank 0's values into every replica. DDP and ZeRO start with it.
void broadcast_parameters(ProcessGroup& group, const NamedParams& params);

// Bit-for-bit agreement of `params` across ranks: each rank hashes its bytes and the hashes are
// gathered. Returns the common hash; throws naming the ranks that differ.
uint64_t check_replicas(ProcessGroup& group, const NamedParams& params);

// The L2 norm of the gradients of every rank's `pieces` together (each rank holding a disjoint
// part of the parameters: ZeRO's and FSDP's shards), summed in fp64; an fp32 scalar.
at::Tensor global_grad_norm(ProcessGroup& group, const NamedParams& pieces);

// A contiguous fp32 copy of `t` for a sharded optimizer's master piece or its gradient: on t's
// device, or with `offload` in CPU memory (pinned when t is on a GPU, so the copy runs by DMA).
at::Tensor master_copy(const at::Tensor& t, bool offload);
// A reduced gradient `g` where `piece` lives: g itself, or, when the piece was offloaded
// (master_copy with offload) and g is on a GPU, a pinned host copy; with non_blocking it is
// queued without waiting (overlapping the rest of the backward) and must not be read before
// global_grad_norm, which every sharded step runs first and which waits for those copies.
at::Tensor grad_for_piece(const at::Tensor& g, const at::Tensor& piece, bool non_blocking);

// The verb: wraps the trainable parameters of a replica in DDP on `group`.
std::unique_ptr<Ddp> apply_ddp(ProcessGroup& group, NamedParams params, const DdpOptions& options);

}  // namespace ftune::parallel
