// FSDP's sharded tensors, gathers and per-unit reduce-scatters; see fsdp.h.
#include "parallel/fsdp.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/StorageImpl.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <optional>

#include "core/error.h"
#include "parallel/storage.h"

namespace ftune::parallel {
namespace {

constexpr int64_t kAlign = 16;  // each tensor's block starts 16-byte aligned in the gather buffer

int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

}  // namespace

struct Fsdp::Impl {
  struct Slot {
    std::string name;
    at::Tensor full;
    bool trainable = false, decay = false;
    std::vector<int64_t> shape;
    int64_t rows = 0, row_numel = 0, rows_per_rank = 0;
    int64_t send_off = 0;   // byte offset of its block in a rank's gather segment
    int64_t train_off = 0;  // the same in a gather of the trainable tensors alone
    int64_t grad_off = 0;   // element offset of its block in a rank's fp32 gradient segment
    at::Tensor shard;       // frozen: this rank's real rows, flat, in the full tensor's dtype
    int piece = -1;         // trainable: index into pieces (-1: no real rows on this rank)
    bool grad_ready = false;
    int64_t block_numel() const { return rows_per_rank * row_numel; }
    int64_t rows_of(int64_t r) const {
      return std::clamp<int64_t>(rows - r * rows_per_rank, 0, rows_per_rank);
    }
  };
  struct Unit {
    std::vector<Slot> slots;
    int64_t seg_bytes = 0;   // per-rank bytes of the all-gather
    int64_t train_seg_bytes = 0;  // per-rank bytes of a gather of the trainable tensors alone
    int64_t grad_seg = 0;    // per-rank fp32 elements of the reduce-scatter
    int64_t trainable = 0, ready = 0;
    bool gathered = false;
    bool in_flight = false;
    bool trainable_only = false;  // the gather (gathered or in flight) holds the trainable tensors
                                  // alone; the frozen ones stay without storage
    at::Tensor send, recv;
    ProcessGroup::Pending work;
  };
  struct Scatter {  // the reduce-scatter in flight (at most one)
    int64_t unit = 0;
    at::Tensor in, out;
    ProcessGroup::Pending work;
  };

  ProcessGroup& group;
  FsdpOptions options;
  std::vector<Unit> units;
  NamedParams pieces;
  std::vector<bool> piece_decay;
  std::vector<std::pair<int64_t, int64_t>> piece_slot;  // (unit, slot) of each piece
  std::optional<Scatter> scatter;
  int64_t gathered_now = 0, peak_gathered = 0;

  Impl(ProcessGroup& g, FsdpOptions o) : group(g), options(o) {}

  void note_gathered(int64_t delta, int64_t transient = 0) {
    gathered_now += delta;
    peak_gathered = std::max(peak_gathered, gathered_now + transient);
  }

  // Each slot's block offset in a rank's gather segment, for a gather of the whole unit and of its
  // trainable tensors alone, from the tensors' current dtypes; blocks start 16-byte aligned.
  static void lay_out(Unit& unit) {
    unit.seg_bytes = unit.train_seg_bytes = 0;
    for (auto& s : unit.slots) {
      const int64_t bytes = s.block_numel() * static_cast<int64_t>(s.full.element_size());
      s.send_off = unit.seg_bytes = align_up(unit.seg_bytes);
      unit.seg_bytes += bytes;
      if (s.trainable) {
        s.train_off = unit.train_seg_bytes = align_up(unit.train_seg_bytes);
        unit.train_seg_bytes += bytes;
      }
    }
    unit.seg_bytes = align_up(unit.seg_bytes);
    unit.train_seg_bytes = align_up(unit.train_seg_bytes);
  }

  // Whether slot `s` takes part in the unit's current gather, and where its block sits.
  static bool in_gather(const Unit& unit, const Slot& s) { return s.trainable || !unit.trainable_only; }
  static int64_t offset_in(const Unit& unit, const Slot& s) {
    return unit.trainable_only ? s.train_off : s.send_off;
  }
  static int64_t segment_of(const Unit& unit) {
    return unit.trainable_only ? unit.train_seg_bytes : unit.seg_bytes;
  }

  // trainable_only: the trainable tensors alone (a LoRA adapter's export needs no frozen base).
  void start_gather(int64_t u, bool trainable_only = false) {
    Unit& unit = units[u];
    if (unit.gathered || unit.in_flight) return;
    at::NoGradGuard no_grad;
    unit.trainable_only = trainable_only;
    const int rank = group.rank(), n = group.size();
    const auto bytes = at::TensorOptions(at::kByte).device(unit.slots.front().full.device());
    unit.send = at::empty({segment_of(unit)}, bytes);
    for (auto& s : unit.slots) {
      const int64_t mine = s.rows_of(rank) * s.row_numel;
      if (mine == 0 || !in_gather(unit, s)) continue;
      at::Tensor dst = unit.send.narrow(0, offset_in(unit, s), mine * s.full.element_size())
                           .view(s.full.scalar_type());
      dst.copy_(s.trainable ? pieces[s.piece].second.detach() : s.shard);
    }
    unit.recv = at::empty({segment_of(unit) * n}, bytes);
    unit.work = group.all_gather_into_async(
        unit.recv, unit.send,
        "all-gather of unit " + std::to_string(u) +
            (trainable_only ? "'s trainable parameters" : "'s parameters"));
    unit.in_flight = true;
  }

  void finish_gather(int64_t u) {
    Unit& unit = units[u];
    unit.work.wait();
    unit.in_flight = false;
    at::NoGradGuard no_grad;
    const int n = group.size();
    int64_t full_bytes = 0;
    for (auto& s : unit.slots) {
      if (!in_gather(unit, s)) continue;
      alloc_storage(s.full);
      full_bytes += nbytes_of(s.full);
      // Through variable_data(): a fresh version counter, so the copy does not count as an
      // in-place change of the tensor autograd saved in the forward.
      at::Tensor dst = s.full.variable_data().view(-1);
      for (int r = 0; r < n; ++r) {
        const int64_t numel = s.rows_of(r) * s.row_numel;
        if (numel == 0) continue;
        dst.narrow(0, r * s.block_numel(), numel)
            .copy_(unit.recv.narrow(0, r * segment_of(unit) + offset_in(unit, s),
                                    numel * s.full.element_size())
                       .view(s.full.scalar_type()));
      }
    }
    note_gathered(full_bytes, nbytes_of(unit.recv));
    unit.send = at::Tensor();
    unit.recv = at::Tensor();
    unit.gathered = true;
  }

  void reshard(int64_t u) {
    Unit& unit = units[u];
    if (unit.in_flight) finish_gather(u);
    if (!unit.gathered) return;
    int64_t full_bytes = 0;
    for (auto& s : unit.slots) {
      if (!in_gather(unit, s)) continue;
      full_bytes += nbytes_of(s.full);
      free_storage(s.full);
    }
    note_gathered(-full_bytes);
    unit.gathered = false;
  }

  // The sums of the last reduce-scatter land in the pieces' gradients.
  void complete_scatter() {
    if (!scatter) return;
    scatter->work.wait();
    at::NoGradGuard no_grad;
    const int rank = group.rank();
    for (auto& s : units[scatter->unit].slots) {
      if (!s.trainable || s.piece < 0) continue;
      at::Tensor& piece = pieces[s.piece].second;
      // The first micro-batch's sum is only read at the step (its copy may overlap the rest of
      // the backward); a later one is added at once.
      at::Tensor g = grad_for_piece(
          scatter->out.narrow(0, s.grad_off, s.rows_of(rank) * s.row_numel), piece,
          /*non_blocking=*/!piece.grad().defined());
      if (piece.grad().defined()) {
        piece.mutable_grad().add_(g);
      } else {
        piece.mutable_grad() = g;  // a view of this scatter's output, which it keeps alive
      }
    }
    scatter.reset();
  }

  // Packs the unit's full gradients rank block by rank block (fp32), drops them, and starts the
  // reduce-scatter; the previous one is completed first, so at most one packed buffer is live.
  void launch_scatter(int64_t u) {
    complete_scatter();
    Unit& unit = units[u];
    at::NoGradGuard no_grad;
    const int n = group.size();
    const auto f32 = at::TensorOptions(at::kFloat).device(unit.slots.front().full.device());
    Scatter sc;
    sc.unit = u;
    sc.in = at::zeros({n * unit.grad_seg}, f32);
    at::Tensor in2 = sc.in.view({n, unit.grad_seg});
    for (auto& s : unit.slots) {
      if (!s.trainable) continue;
      at::Tensor g = s.full.grad();
      if (g.defined()) {
        at::Tensor flat = g.reshape(-1);
        for (int r = 0; r < n; ++r) {
          const int64_t numel = s.rows_of(r) * s.row_numel;
          if (numel == 0) continue;
          in2[r].narrow(0, s.grad_off, numel).copy_(flat.narrow(0, r * s.block_numel(), numel));
        }
        s.full.mutable_grad() = at::Tensor();
      }
      s.grad_ready = false;
    }
    unit.ready = 0;
    sc.out = at::empty({unit.grad_seg}, f32);
    sc.work = group.reduce_scatter_async(sc.out, sc.in, "reduce-scatter of unit " +
                                                            std::to_string(u) + "'s gradients");
    scatter = std::move(sc);
  }

  void on_gradient(int64_t u, size_t slot) {
    Unit& unit = units[u];
    Slot& s = unit.slots[slot];
    if (s.grad_ready) return;
    s.grad_ready = true;
    if (++unit.ready == unit.trainable) launch_scatter(u);
  }
};

namespace {

struct FsdpGradHook : torch::autograd::PostAccumulateGradHook {
  FsdpGradHook(Fsdp::Impl* impl, int64_t unit, size_t slot)
      : impl_(impl), unit_(unit), slot_(slot) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override {
    impl_->on_gradient(unit_, slot_);
  }
  Fsdp::Impl* impl_;
  int64_t unit_;
  size_t slot_;
};

}  // namespace

Fsdp::Fsdp(ProcessGroup& group, std::vector<std::vector<FsdpTensor>> units, FsdpOptions options)
    : impl_(std::make_unique<Impl>(group, options)) {
  Impl& im = *impl_;
  const int rank = group.rank(), n = group.size();
  at::NoGradGuard no_grad;
  im.units.resize(units.size());
  for (size_t u = 0; u < units.size(); ++u) {
    Impl::Unit& unit = im.units[u];
    for (auto& t : units[u]) {
      FTUNE_CHECK(t.full.defined() && t.full.dim() >= 1 && t.full.numel() > 0, "fsdp: tensor ",
                  t.name, " is empty or a scalar: nothing to shard");
      Impl::Slot s;
      s.name = t.name;
      s.full = t.full;
      s.trainable = t.trainable;
      s.decay = t.decay;
      s.shape = t.full.sizes().vec();
      s.rows = t.full.size(0);
      s.row_numel = t.full.numel() / s.rows;
      s.rows_per_rank = (s.rows + n - 1) / n;
      // A tensor that shares or views its storage gets one of its own first.
      if (!owns_storage(s.full)) s.full.set_data(s.full.clone(at::MemoryFormat::Contiguous));
      const int64_t mine = s.rows_of(rank) * s.row_numel;
      // A rank past the last row (a tensor with fewer rows than ranks) holds an empty block.
      at::Tensor flat = s.full.detach().reshape(-1);
      at::Tensor my_rows = mine > 0 ? flat.narrow(0, rank * s.block_numel(), mine)
                                    : flat.narrow(0, 0, 0);
      if (s.trainable) {
        if (mine > 0) {
          s.piece = static_cast<int>(im.pieces.size());
          im.pieces.emplace_back(s.name,
                                 master_copy(my_rows, options.offload).requires_grad_(true));
          im.piece_decay.push_back(s.decay);
          im.piece_slot.emplace_back(u, unit.slots.size());
        }
        if (s.full.scalar_type() != options.param_dtype) {
          s.full.set_data(at::empty(s.shape, s.full.options().dtype(options.param_dtype)));
        }
        s.grad_off = unit.grad_seg;
        unit.grad_seg += s.block_numel();
        ++unit.trainable;
      } else {
        s.shard = my_rows.clone();
      }
      free_storage(s.full);
      unit.slots.push_back(std::move(s));
    }
    Impl::lay_out(unit);
  }
  for (size_t u = 0; u < im.units.size(); ++u) {
    for (size_t k = 0; k < im.units[u].slots.size(); ++k) {
      if (!im.units[u].slots[k].trainable) continue;
      torch::autograd::impl::set_post_acc_grad_hooks(
          im.units[u].slots[k].full,
          std::make_unique<FsdpGradHook>(impl_.get(), static_cast<int64_t>(u), k));
    }
  }
}

Fsdp::~Fsdp() {
  for (auto& unit : impl_->units) {
    for (auto& s : unit.slots) {
      if (s.trainable) torch::autograd::impl::set_post_acc_grad_hooks(s.full, nullptr);
    }
  }
}

int64_t Fsdp::unit_count() const { return static_cast<int64_t>(impl_->units.size()); }
const NamedParams& Fsdp::pieces() const { return impl_->pieces; }
std::vector<bool> Fsdp::decays() const { return impl_->piece_decay; }

std::vector<Fsdp::Spot> Fsdp::layout() const {
  std::vector<Spot> out;
  for (const auto& [u, k] : impl_->piece_slot) {
    const auto& s = impl_->units[u].slots[k];
    out.push_back({s.name, s.shape, impl_->group.rank() * s.block_numel()});
  }
  return out;
}

void Fsdp::gather(int64_t unit) {
  Impl::Unit& u = impl_->units.at(unit);
  if (u.gathered && u.trainable_only) impl_->reshard(unit);  // the frozen tensors are wanted too
  if (u.gathered || u.slots.empty()) return;
  impl_->start_gather(unit);
  impl_->finish_gather(unit);
}

void Fsdp::gather_trainable(int64_t unit) {
  Impl::Unit& u = impl_->units.at(unit);
  if (u.in_flight) impl_->finish_gather(unit);  // a prefetch of the whole unit serves as well
  if (u.gathered || u.trainable == 0) return;
  impl_->start_gather(unit, /*trainable_only=*/true);
  impl_->finish_gather(unit);
}

void Fsdp::set_trainable_dtype(at::ScalarType dtype) {
  Impl& im = *impl_;
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < im.units.size(); ++u) {
    im.reshard(static_cast<int64_t>(u));
    for (auto& s : im.units[u].slots) {
      if (!s.trainable || s.full.scalar_type() == dtype) continue;
      s.full.set_data(at::empty(s.shape, s.full.options().dtype(dtype)));  // pages never touched
      free_storage(s.full);
    }
    Impl::lay_out(im.units[u]);
  }
}

void Fsdp::prefetch(int64_t unit) {
  if (!impl_->units.at(unit).slots.empty()) impl_->start_gather(unit);
}

void Fsdp::reshard(int64_t unit) { impl_->reshard(unit); }
bool Fsdp::gathered(int64_t unit) const { return impl_->units.at(unit).gathered; }

void Fsdp::finish_backward() {
  Impl& im = *impl_;
  // Units whose gradients came only in part (a trainable tensor the loss did not reach) are
  // reduce-scattered now, in unit order on every rank.
  for (size_t u = im.units.size(); u-- > 0;) {
    if (im.units[u].ready > 0) im.launch_scatter(static_cast<int64_t>(u));
  }
  im.complete_scatter();
  for (size_t u = 0; u < im.units.size(); ++u) im.reshard(static_cast<int64_t>(u));
}

at::Tensor Fsdp::global_grad_norm() {
  return parallel::global_grad_norm(impl_->group, impl_->pieces);
}

int64_t Fsdp::shard_bytes() const {
  int64_t total = 0;
  for (const auto& [name, p] : impl_->pieces) total += nbytes_of(p);
  for (const auto& unit : impl_->units) {
    for (const auto& s : unit.slots) {
      if (s.shard.defined()) total += nbytes_of(s.shard);
    }
  }
  return total;
}

int64_t Fsdp::gathered_bytes() const { return impl_->gathered_now; }

int64_t Fsdp::take_peak_gathered_bytes() {
  const int64_t peak = impl_->peak_gathered;
  impl_->peak_gathered = impl_->gathered_now;
  return peak;
}

int64_t Fsdp::gather_payload_bytes() const {
  int64_t total = 0;
  for (const auto& unit : impl_->units) total += unit.seg_bytes * impl_->group.size();
  return total;
}

}  // namespace ftune::parallel
