// FSDP / ZeRO-3: every tensor of the model is cut along dim 0 into equal row blocks, one per rank
// (the last blocks padded), as FSDP2 shards each parameter on its own; nothing is flattened
// together, so frozen and trainable tensors (LoRA) and packed 4-bit weights (QLoRA) never share
// a buffer. Tensors are grouped into units (one decoder layer each). Between uses a unit's full
// tensors keep their shape but have no storage; gather(u) all-gathers the unit's row blocks in one
// collective (bytes, so fp32, bf16 and uint8 tensors travel together) and copies them into
// freshly allocated storage, which reshard(u) frees again. Autograd's saved references see the
// refilled storage, so a unit gathered again before its backward computes with the same values.
// Trainable tensors: each rank keeps an fp32 master piece (its real rows, a 1-D leaf) that the
// optimizer steps; the full tensor is gathered in `param_dtype` (bf16 for mixed precision). When
// every trainable tensor of a unit has its gradient, the gradients are reduce-scattered (in fp32)
// at once, in the background, and the full gradients dropped; the pieces accumulate their sums.
// Defines FsdpTensor, FsdpOptions, Fsdp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/ddp.h"
#include "parallel/process_group.h"

namespace ftune::parallel {

struct FsdpTensor {
  std::string name;
  at::Tensor full;          // the model's tensor (parameter or 4-bit buffer), full shape
  bool trainable = false;   // gets an fp32 master piece and a reduce-scattered gradient
  bool decay = false;       // weight decay for its piece (the parameter has dim >= 2)
};

struct FsdpOptions {
  at::ScalarType param_dtype = at::kFloat;  // what trainable tensors are gathered and computed in
  bool offload = false;  // the fp32 master pieces and their gradients live in (pinned) CPU memory
};

class Fsdp {
 public:
  // `units[u]`: the tensors of unit u, identical on every rank (each rank keeps only its rows of
  // the values it was given; the full storage is freed here). Registers the gradient hooks.
  Fsdp(ProcessGroup& group, std::vector<std::vector<FsdpTensor>> units, FsdpOptions options = {});
  ~Fsdp();
  Fsdp(const Fsdp&) = delete;
  Fsdp& operator=(const Fsdp&) = delete;

  int64_t unit_count() const;

  // The trainable tensors' pieces on this rank (fp32 1-D leaves holding this rank's real rows;
  // ranks whose rows are all padding get none), named like their tensors: build the optimizer
  // over these. Their weight-decay flags, and where each sits in its tensor (flat offset).
  const NamedParams& pieces() const;
  std::vector<bool> decays() const;
  struct Spot {
    std::string name;
    std::vector<int64_t> shape;
    int64_t offset = 0;
  };
  std::vector<Spot> layout() const;

  // Full values of unit u present when gather returns (it waits for a prefetch of u, or starts
  // and waits). prefetch starts the all-gather in the background (no-op if gathered or started).
  // reshard frees the full storage (waiting for a gather of u still in flight).
  void gather(int64_t unit);
  // The same for the trainable tensors alone (from the master pieces, in param_dtype); the frozen
  // ones (a LoRA base, 4-bit weights) keep no storage and move no bytes. What exporting a LoRA
  // adapter needs. A unit gathered this way is gathered whole by a later gather(unit).
  void gather_trainable(int64_t unit);
  void prefetch(int64_t unit);
  // Reshards every unit and makes the trainable tensors gather in `dtype` from now on (the
  // pieces are fp32): an export of a mixed-precision run gathers them in fp32, as the
  // one-process run holds them, then sets param_dtype back.
  void set_trainable_dtype(at::ScalarType dtype);
  void reshard(int64_t unit);
  bool gathered(int64_t unit) const;

  // After the backward of a micro-batch: reduce-scatters the units whose gradients were not all
  // ready, waits for every reduce-scatter, leaves the sums in the pieces' .grad (accumulating
  // over micro-batches) and reshards every unit.
  void finish_backward();
  // The L2 norm of the whole gradient from the pieces (fp32 scalar).
  at::Tensor global_grad_norm();

  // Bytes this rank holds now: the pieces and the frozen tensors' row blocks (shards), the full
  // tensors currently gathered; and the largest gathered footprint seen (full tensors plus the
  // gather's receive buffer), reset by take_peak_gathered_bytes().
  int64_t shard_bytes() const;
  int64_t gathered_bytes() const;
  int64_t take_peak_gathered_bytes();
  // Bytes every rank sends per full gather of all units (payload, padding included), for tests.
  int64_t gather_payload_bytes() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace ftune::parallel
