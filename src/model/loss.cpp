// Shifted, fp32 causal-LM cross-entropy sum, on full logits or chunked over target rows; see
// loss.h. The chunked form computes its gradients during forward (the softmax is at hand then),
// so backward only scales them by the incoming gradient: no logits are recomputed or stored.
#include "model/loss.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <algorithm>

#include "core/error.h"

namespace ftune::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Logits per chunk when chunk_rows is 0: 64 MB of fp32.
constexpr int64_t kChunkLogits = int64_t{1} << 24;

struct ChunkGrads {
  at::Tensor rows;    // [N, H] in the projection dtype, for grad_out = 1
  at::Tensor weight;  // [V, H] fp32, for grad_out = 1
};

// Sum over the N rows of -log softmax(rows @ weight^T)[target] (fp32 scalar), and with `grads`
// the gradients of that sum wrt rows and/or weight. Runs without autograd.
at::Tensor chunked_cross_entropy(const at::Tensor& rows, const at::Tensor& weight,
                                 const at::Tensor& targets, int64_t chunk_rows,
                                 bool want_rows, bool want_weight, ChunkGrads* grads) {
  // The projection dtype the plain path's at::linear gets: the autocast dtype when autocast is on
  // (it casts both operands), else the weight's.
  const auto dev = rows.device().type();
  const at::ScalarType cdt = at::autocast::is_autocast_enabled(dev)
                                 ? at::autocast::get_autocast_dtype(dev)
                                 : weight.scalar_type();
  // The casts are explicit, so autocast must not re-cast the fp32 softmax math below.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::Tensor w = weight.to(cdt);  // [V, H]
  const at::Tensor x = rows.to(cdt);    // [N, H]
  const int64_t N = x.size(0), H = x.size(1), V = w.size(0);
  at::Tensor loss = at::zeros({}, rows.options().dtype(at::kFloat));
  if (want_rows) grads->rows = at::empty({N, H}, x.options());
  if (want_weight && N == 0) grads->weight = at::zeros({V, H}, w.options().dtype(at::kFloat));
  for (int64_t s = 0; s < N; s += chunk_rows) {
    const int64_t e = std::min(N, s + chunk_rows);
    const at::Tensor xc = x.slice(0, s, e);                     // [c, H]
    const at::Tensor tc = targets.slice(0, s, e).unsqueeze(1);  // [c, 1]
    at::Tensor logits = at::mm(xc, w.t());                      // [c, V] in cdt
    at::Tensor z = logits.scalar_type() == at::kFloat ? logits : logits.to(at::kFloat);
    logits = at::Tensor();
    // In place on the one fp32 buffer: loss = max + log(sum exp(z - max)) - z[target], as
    // log_softmax + nll compute it; then z becomes softmax - onehot, d(loss)/d(logits).
    const at::Tensor max = std::get<0>(z.max(1, /*keepdim=*/true));  // [c, 1]
    const at::Tensor target_logit = z.gather(1, tc);                  // [c, 1]
    z.sub_(max).exp_();
    const at::Tensor sum_exp = z.sum(1, /*keepdim=*/true);            // [c, 1]
    loss.add_((max + sum_exp.log() - target_logit).sum());
    if (!want_rows && !want_weight) continue;
    z.div_(sum_exp);
    z.scatter_add_(1, tc, at::full({e - s, 1}, -1.0, z.options()));
    const at::Tensor g = z.scalar_type() == cdt ? z : z.to(cdt);  // [c, V]
    if (want_rows) {
      at::Tensor dst = grads->rows.slice(0, s, e);  // [c, H], contiguous
      at::mm_out(dst, g, w);
    }
    if (want_weight) {
      if (!grads->weight.defined()) {
        grads->weight = at::mm(g.t(), xc).to(at::kFloat);
      } else if (cdt == at::kFloat) {
        grads->weight.addmm_(g.t(), xc);
      } else {
        grads->weight.add_(at::mm(g.t(), xc));  // bf16 product, accumulated in fp32
      }
    }
  }
  return loss;
}

// Autograd wrapper: forward keeps the gradients for grad_out = 1, backward scales them.
struct ChunkedLmLoss : public torch::autograd::Function<ChunkedLmLoss> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rows, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t chunk_rows) {
    ChunkGrads g;
    at::Tensor loss = chunked_cross_entropy(rows, weight, targets, chunk_rows,
                                            rows.requires_grad(), weight.requires_grad(), &g);
    ctx->saved_data["grad_rows"] = g.rows;
    ctx->saved_data["grad_weight"] = g.weight;
    ctx->saved_data["rows_dtype"] = rows.scalar_type();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    FTUNE_CHECK(ctx->saved_data.count("grad_rows"),
                "chunked_lm_loss_sum: backward ran twice (its gradients are released after one)");
    auto take = [&](const char* key) {
      const at::IValue& v = ctx->saved_data[key];
      return v.isTensor() ? v.toTensor() : at::Tensor();  // an undefined tensor is stored as None
    };
    at::Tensor gr = take("grad_rows"), gw = take("grad_weight");
    const auto rows_dtype = ctx->saved_data["rows_dtype"].toScalarType();
    const auto weight_dtype = ctx->saved_data["weight_dtype"].toScalarType();
    ctx->saved_data.clear();  // the gradients are scaled in place and handed over
    const at::Tensor& scale = grad_out[0];  // scalar
    if (gr.defined()) gr = gr.to(rows_dtype).mul_(scale);
    if (gw.defined()) gw = gw.mul_(scale).to(weight_dtype);
    return {gr, gw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

LossSum causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t V = logits.size(-1);
  at::Tensor shift_logits = logits.slice(1, 0, -1).to(at::kFloat).reshape({-1, V});  // [B*(T-1), V]
  at::Tensor shift_labels = labels.slice(1, 1).reshape({-1});                        // [B*(T-1)]
  at::Tensor sum = at::cross_entropy_loss(shift_logits, shift_labels, {},
                                          at::Reduction::Sum, kIgnoreIndex);
  int64_t count = shift_labels.ne(kIgnoreIndex).sum().item<int64_t>();
  return {sum, count};
}

LossSum chunked_lm_loss_sum(const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk_rows) {
  FTUNE_CHECK(hidden.dim() == 3 && labels.dim() == 2 && weight.dim() == 2 &&
                  hidden.size(0) == labels.size(0) && hidden.size(1) == labels.size(1) &&
                  hidden.size(2) == weight.size(1),
              "loss: expected hidden [B, T, H], weight [V, H], labels [B, T]; got ",
              hidden.sizes(), ", ", weight.sizes(), ", ", labels.sizes());
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2), V = weight.size(0);
  // Position t carries a target when labels[t + 1] is not ignored; the last position never does.
  const at::Tensor next = labels.slice(1, 1).ne(kIgnoreIndex);  // [B, T-1]
  const at::Tensor carries = at::cat({next, at::zeros({B, 1}, next.options())}, 1);  // [B, T]
  const at::Tensor idx = carries.reshape({-1}).nonzero().squeeze(1);  // [N] flat b * T + t
  const int64_t N = idx.size(0);
  const at::Tensor targets = labels.reshape({-1}).index_select(0, idx + 1);  // [N]
  if (N > 0) {
    auto [lo, hi] = at::aminmax(targets);
    const int64_t tmin = lo.item<int64_t>(), tmax = hi.item<int64_t>();
    FTUNE_CHECK(tmin >= 0 && tmax < V, "loss: labels: target id ", tmin < 0 ? tmin : tmax,
                " is outside the vocabulary [0, ", V, ")");
  }
  const at::Tensor rows = hidden.reshape({B * T, H}).index_select(0, idx);  // [N, H]
  const int64_t chunk = chunk_rows > 0 ? chunk_rows : std::max<int64_t>(1, kChunkLogits / V);
  at::Tensor sum;
  if (at::GradMode::is_enabled() && (rows.requires_grad() || weight.requires_grad())) {
    sum = ChunkedLmLoss::apply(rows, weight, targets, chunk);
  } else {
    sum = chunked_cross_entropy(rows, weight, targets, chunk, false, false, nullptr);
  }
  return {sum, N};
}

}  // namespace ftune::model
