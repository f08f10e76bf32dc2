// DDP's buckets and hooks; see ddp.h. The hook of each parameter runs on the autograd thread right
// after its gradient is accumulated; the bucket's copy into its flat buffer happens there too, so
// the all-reduce (on Gloo's or NCCL's own threads) overlaps the backward of earlier layers.
#include "parallel/ddp.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace ftune::parallel {
namespace {

// A fast 64-bit hash of a tensor's bytes (word-wise multiply-xor): equal bytes, equal hash.
uint64_t hash_bytes(const at::Tensor& t, uint64_t h) {
  const at::Tensor c = t.contiguous().cpu();
  const auto* p = static_cast<const unsigned char*>(c.data_ptr());
  const size_t n = static_cast<size_t>(c.numel()) * c.element_size();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

}  // namespace

struct Ddp::Impl {
  struct Bucket {
    std::vector<size_t> params;  // indices into `params`, in the order their gradients come
    std::vector<int64_t> offsets;
    at::Tensor flat;             // [numel] the summed gradients travel here
    int64_t waiting = 0;         // gradients not yet arrived in this backward
    bool launched = false;
    ProcessGroup::Pending work;
  };

  ProcessGroup& group;
  NamedParams params;
  std::vector<size_t> bucket_of;  // param index -> bucket
  std::vector<char> arrived;
  std::vector<Bucket> buckets;
  size_t next_launch = 0;
  bool sync = false;
  int64_t grad_bytes = 0;

  Impl(ProcessGroup& g, NamedParams p) : group(g), params(std::move(p)) {}

  void reset() {
    std::fill(arrived.begin(), arrived.end(), 0);
    for (auto& b : buckets) {
      b.waiting = static_cast<int64_t>(b.params.size());
      b.launched = false;
    }
    next_launch = 0;
  }

  void on_gradient(size_t i) {
    if (!sync) return;
    FTUNE_CHECK(!arrived[i], "rank ", group.rank(), ": parameter ", params[i].first,
                " received its gradient twice in one backward; DDP all-reduces each gradient once");
    arrived[i] = 1;
    if (--buckets[bucket_of[i]].waiting == 0) launch_ready();
  }

  // Launches, in bucket order, every bucket whose gradients are all in.
  void launch_ready() {
    while (next_launch < buckets.size() && buckets[next_launch].waiting == 0) launch(next_launch++);
  }

  void launch(size_t k) {
    Bucket& b = buckets[k];
    for (size_t j = 0; j < b.params.size(); ++j) {
      const at::Tensor& p = params[b.params[j]].second;
      at::Tensor slice = b.flat.narrow(0, b.offsets[j], p.numel());
      if (p.grad().defined()) {
        slice.copy_(p.grad().reshape({-1}));
      } else {
        slice.zero_();  // an unused parameter contributes nothing
      }
    }
    b.launched = true;
    b.work = group.all_reduce_async(b.flat, "all-reduce of gradient bucket " +
                                                std::to_string(k + 1) + "/" +
                                                std::to_string(buckets.size()));
  }
};

namespace {

struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(Ddp::Impl* impl, size_t index) : impl_(impl), index_(index) {}
  void operator()(const torch::autograd::Variable& /*param*/) override {
    impl_->on_gradient(index_);
  }
  Ddp::Impl* impl_;
  size_t index_;
};

}  // namespace

void broadcast_parameters(ProcessGroup& group, const NamedParams& params) {
  const int rank = group.rank();
  // Same trainable parameters everywhere: count, then every numel, checked against rank 0's.
  const auto n = static_cast<int64_t>(params.size());
  at::Tensor sizes = at::empty({n + 1}, at::kLong);
  sizes[0] = n;
  for (int64_t i = 0; i < n; ++i) sizes[i + 1] = params[i].second.numel();
  at::Tensor rank0_count = sizes.narrow(0, 0, 1).clone();
  group.broadcast(rank0_count, 0, "broadcast of the parameter count");
  FTUNE_CHECK(rank0_count.item<int64_t>() == n, "rank ", rank, ": this rank trains ", n,
              " parameter tensors, rank 0 trains ", rank0_count.item<int64_t>(),
              " (the same model, lora and quant settings on every rank?)");
  at::Tensor rank0_sizes = sizes.clone();
  group.broadcast(rank0_sizes, 0, "broadcast of the parameter shapes");
  for (int64_t i = 0; i < n; ++i) {
    FTUNE_CHECK(rank0_sizes[i + 1].item<int64_t>() == params[i].second.numel(), "rank ", rank,
                ": parameter ", params[i].first, " has ", params[i].second.numel(),
                " elements here and ", rank0_sizes[i + 1].item<int64_t>(), " on rank 0");
  }

  // Rank 0's values in every replica (one broadcast per parameter, before any hook exists).
  {
    at::NoGradGuard no_grad;
    for (auto& [name, p] : params) {
      at::Tensor buf = p.detach().contiguous();
      group.broadcast(buf, 0, "broadcast of parameter " + name);
      if (!buf.is_same(p)) p.detach().copy_(buf);
    }
  }
}

Ddp::Ddp(ProcessGroup& group, NamedParams params, DdpOptions options)
    : impl_(std::make_unique<Impl>(group, std::move(params))) {
  auto& im = *impl_;
  FTUNE_CHECK(options.bucket_bytes > 0, "parallel.bucket_mb: must be positive");
  broadcast_parameters(group, im.params);
  const auto n = static_cast<int64_t>(im.params.size());

  // Buckets in reverse order (backward produces the last layers' gradients first), cut at
  //    bucket_bytes and at dtype changes.
  im.bucket_of.assign(im.params.size(), 0);
  im.arrived.assign(im.params.size(), 0);
  int64_t bytes = 0;
  for (int64_t i = n - 1; i >= 0; --i) {
    const at::Tensor& p = im.params[i].second;
    const int64_t pb = p.numel() * p.element_size();
    const bool new_bucket =
        im.buckets.empty() || bytes + pb > options.bucket_bytes ||
        im.params[im.buckets.back().params.front()].second.scalar_type() != p.scalar_type();
    if (new_bucket) {
      im.buckets.emplace_back();
      bytes = 0;
    }
    auto& b = im.buckets.back();
    b.offsets.push_back(b.params.empty() ? 0 : b.offsets.back() +
                                                   im.params[b.params.back()].second.numel());
    b.params.push_back(static_cast<size_t>(i));
    im.bucket_of[i] = im.buckets.size() - 1;
    bytes += pb;
    im.grad_bytes += pb;
  }
  for (auto& b : im.buckets) {
    const at::Tensor& last = im.params[b.params.back()].second;
    b.flat = at::zeros({b.offsets.back() + last.numel()}, last.options());
  }
  im.reset();

  // Hooks.
  for (size_t i = 0; i < im.params.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(
        im.params[i].second, std::make_unique<GradReadyHook>(impl_.get(), i));
  }
}

Ddp::~Ddp() {
  for (auto& [name, p] : impl_->params) {
    torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  }
}

void Ddp::set_sync(bool sync) { impl_->sync = sync; }

void Ddp::finish() {
  auto& im = *impl_;
  if (!im.sync) return;
  for (auto& b : im.buckets) b.waiting = 0;  // whatever has not arrived is zero
  im.launch_ready();
  for (auto& b : im.buckets) b.work.wait();
  at::NoGradGuard no_grad;
  for (auto& b : im.buckets) {
    for (size_t j = 0; j < b.params.size(); ++j) {
      at::Tensor& p = im.params[b.params[j]].second;
      at::Tensor slice = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(slice);
      } else {
        p.mutable_grad() = slice.clone();
      }
    }
  }
  im.reset();
  im.sync = false;
}

uint64_t check_replicas(ProcessGroup& group, const NamedParams& params) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const auto& [name, p] : params) h = hash_bytes(p.detach(), h);
  const int world = group.size();
  at::Tensor all = at::empty({world}, at::kLong);
  group.all_gather_into(all, at::full({1}, static_cast<int64_t>(h), at::kLong),
                        "all-gather of the parameter hashes");
  std::string differ;
  for (int r = 1; r < world; ++r) {
    if (all[r].item<int64_t>() != all[0].item<int64_t>()) {
      differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    }
  }
  FTUNE_CHECK(differ.empty(), "rank ", group.rank(), ": the parameters of rank(s) ", differ,
              " differ from rank 0's: the replicas diverged");
  return h;
}

int64_t Ddp::gradient_bytes() const { return impl_->grad_bytes; }

std::unique_ptr<Ddp> apply_ddp(ProcessGroup& group, NamedParams params,
                               const DdpOptions& options) {
  return std::make_unique<Ddp>(group, std::move(params), options);
}

at::Tensor global_grad_norm(ProcessGroup& group, const NamedParams& pieces) {
  // Offloaded gradients may still be in flight (grad_for_piece): a blocking copy on the same
  // stream returns only after every copy queued before it.
  if (!group.device().is_cpu()) (void)at::empty({1}, at::TensorOptions().device(group.device())).cpu();
  at::NoGradGuard no_grad;
  // Squares summed in fp64 a chunk at a time: upcasting a whole gradient would hold 16 bytes per
  // element of the largest one at the step's peak (SmolLM2-135M's embedding: 453 MB, measured;
  // Llama-3-8B's: 8.4 GB).
  constexpr int64_t kChunk = int64_t{1} << 20;
  at::Tensor sq = at::zeros({1}, at::TensorOptions(at::kDouble));
  for (const auto& [name, t] : pieces) {
    if (!t.grad().defined()) continue;
    const at::Tensor flat = t.grad().reshape(-1);
    at::Tensor part = at::zeros({}, flat.options().dtype(at::kDouble));
    for (int64_t i = 0; i < flat.numel(); i += kChunk) {
      part += flat.narrow(0, i, std::min(kChunk, flat.numel() - i)).to(at::kDouble).pow(2).sum();
    }
    sq += part.cpu();
  }
  sq = sq.to(group.device());
  group.all_reduce(sq, "all-reduce of the gradient norm");
  return sq.sqrt().to(at::kFloat).reshape({});
}

at::Tensor master_copy(const at::Tensor& t, bool offload) {
  if (!offload || t.device().is_cpu()) {
    return t.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  }
  at::Tensor out = at::empty(t.sizes(), at::TensorOptions(at::kFloat).pinned_memory(true));
  return out.copy_(t);
}

at::Tensor grad_for_piece(const at::Tensor& g, const at::Tensor& piece, bool non_blocking) {
  if (g.device() == piece.device()) return g;
  // A GPU gradient for a host piece: a DMA into pinned memory, queued without waiting when the
  // caller does not read it before the step, so the backward's next kernels and collectives go
  // on meanwhile; global_grad_norm waits for it.
  at::Tensor out = at::empty(g.sizes(), at::TensorOptions(at::kFloat).pinned_memory(true));
  return out.copy_(g, non_blocking);
}

}  // namespace ftune::parallel
