// ZeRO-1/2 shards; see zero.h. The flat space is never materialized for the parameters
// themselves (each replica keeps its own tensors); flat buffers exist only while gradients,
// updated shards or optimizer state travel.
#include "parallel/zero.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace ftune::parallel {

ZeroShard::ZeroShard(ProcessGroup& group, NamedParams params, int stage, bool offload)
    : group_(group), params_(std::move(params)), stage_(stage) {
  FTUNE_CHECK(stage == 1 || stage == 2, "ZeRO stage ", stage, ": expected 1 or 2");
  broadcast_parameters(group_, params_);
  int64_t numel = 0;  // trainable elements
  for (const auto& [name, p] : params_) {
    FTUNE_CHECK(p.scalar_type() == at::kFloat, "ZeRO: trainable parameter ", name, " is ",
                p.scalar_type(), "; the shards are fp32");
    offsets_.push_back(numel);
    numel += p.numel();
  }
  const int64_t n = group_.size();
  shard_ = (numel + n - 1) / n;
  const int64_t lo = group_.rank() * shard_, hi = lo + shard_;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    const int64_t begin = std::max(lo, offsets_[i]);
    const int64_t end = std::min(hi, offsets_[i] + params_[i].second.numel());
    if (begin >= end) continue;
    Piece pc{i, begin - offsets_[i], begin - lo, end - begin};
    layout_.push_back(pc);
    at::Tensor t = master_copy(
        params_[i].second.detach().reshape({-1}).narrow(0, pc.param_offset, pc.length), offload);
    t.requires_grad_(true);
    pieces_.emplace_back(params_[i].first, t);
  }
}

std::vector<bool> ZeroShard::decays() const {
  std::vector<bool> out;
  for (const auto& pc : layout_) out.push_back(params_[pc.param].second.dim() >= 2);
  return out;
}

void ZeroShard::reduce_gradients() {
  at::NoGradGuard no_grad;
  const int64_t n = group_.size();
  at::Tensor flat = at::zeros({shard_ * n}, params_[0].second.options());
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    if (p.grad().defined()) {
      flat.narrow(0, offsets_[i], p.numel()).copy_(p.grad().reshape({-1}));
      p.mutable_grad().reset();  // the shard's sum replaces it
    }
  }
  at::Tensor mine;
  if (stage_ == 1) {
    group_.all_reduce(flat, "ZeRO-1: all-reduce of the gradients");
    mine = flat.narrow(0, group_.rank() * shard_, shard_);
  } else {
    mine = at::empty({shard_}, flat.options());
    group_.reduce_scatter(mine, flat, "ZeRO-2: reduce-scatter of the gradients");
  }
  for (size_t k = 0; k < layout_.size(); ++k) {
    at::Tensor& piece = pieces_[k].second;
    piece.mutable_grad() =
        grad_for_piece(mine.narrow(0, layout_[k].shard_offset, layout_[k].length), piece,
                       /*non_blocking=*/true);
  }
}

at::Tensor ZeroShard::global_grad_norm() { return parallel::global_grad_norm(group_, pieces_); }

void ZeroShard::gather_parameters() {
  at::NoGradGuard no_grad;
  at::Tensor send = at::zeros({shard_}, params_[0].second.options());
  for (size_t k = 0; k < layout_.size(); ++k) {
    send.narrow(0, layout_[k].shard_offset, layout_[k].length).copy_(pieces_[k].second);
  }
  at::Tensor flat = at::empty({shard_ * group_.size()}, send.options());
  group_.all_gather_into(flat, send, "all-gather of the updated parameter shards");
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i].second;
    p.detach().view({-1}).copy_(flat.narrow(0, offsets_[i], p.numel()));
  }
}

}  // namespace ftune::parallel
