// One pipeline stage's runtime; see pipeline.h.
#include "parallel/pipeline.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <map>
#include <string>

#include "core/error.h"

namespace ftune::parallel {
namespace {

std::string slot_name(const char* what, int64_t mb, int64_t from, int64_t to) {
  return std::string(what) + " of micro-batch " + std::to_string(mb) + " from stage " +
         std::to_string(from) + " to stage " + std::to_string(to);
}

}  // namespace

PipelineStage::PipelineStage(ProcessGroup& group, PipeSchedule schedule,
                             at::ScalarType act_dtype, at::Device device)
    : group_(group), schedule_(schedule), act_dtype_(act_dtype), device_(device) {}

double PipelineStage::now() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

void PipelineStage::begin_step() {
  group_.barrier("barrier at the start of a pipeline step");
  t0_ = std::chrono::steady_clock::now();
  stats_ = StageStats{};
  stats_.begin_wall = std::chrono::duration<double>(
                          std::chrono::system_clock::now().time_since_epoch()).count();
}

void PipelineStage::run_round(int64_t round, int64_t micro_batches, const StageCallbacks& cb,
                              bool train) {
  const int64_t s = stage();
  const auto opts = at::TensorOptions().dtype(act_dtype_).device(device_);
  // Activations and output gradients travel in opposite directions between two neighbours, and
  // each kind in micro-batch order on both sides; the tag keeps them apart all the same.
  const int kActTag = 0, kGradTag = 1;
  std::vector<ProcessGroup::Pending> sends;
  std::vector<at::Tensor> sent;  // alive until their sends complete
  auto send = [&](const at::Tensor& t, int64_t to, const std::string& what, int tag) {
    at::Tensor c = t.contiguous();
    sends.push_back(group_.send_async(c, static_cast<int>(to), what, tag));
    sent.push_back(std::move(c));
  };
  auto receive = [&](const std::vector<int64_t>& shape, int64_t from, const std::string& what,
                     int tag) {
    at::Tensor t = at::empty(shape, opts);
    group_.recv(t, static_cast<int>(from), what, tag);
    return t;
  };

  if (!train) {
    at::NoGradGuard no_grad;
    for (int64_t m = 0; m < micro_batches; ++m) {
      const int64_t mb = round * micro_batches + m;
      at::Tensor in;
      if (!is_first()) {
        in = receive(cb.input_shape(m), s - 1, slot_name("activation", mb, s - 1, s), kActTag);
      }
      const double start = now();
      at::Tensor out = cb.forward(m, in);
      stats_.spans.push_back({mb, true, start, now()});  // its compute: ends before the send
      if (!is_last()) send(out, s + 1, slot_name("activation", mb, s, s + 1), kActTag);
    }
    for (auto& p : sends) p.wait();
    return;
  }

  std::map<int64_t, at::Tensor> inputs, outputs;  // held from forward to backward
  const std::vector<PipeSlot> order = stage_order(schedule_, s, stages(), micro_batches);
  int64_t last_backward = -1;
  for (const PipeSlot& slot : order) {
    if (!slot.forward) last_backward = slot.micro_batch;
  }
  for (const PipeSlot& slot : order) {
    const int64_t m = slot.micro_batch, mb = round * micro_batches + m;
    if (slot.forward) {
      at::Tensor in;
      if (!is_first()) {
        in = receive(cb.input_shape(m), s - 1, slot_name("activation", mb, s - 1, s), kActTag);
        in.requires_grad_(true);
      }
      const double start = now();
      at::Tensor out = cb.forward(m, in);
      stats_.spans.push_back({mb, true, start, now()});
      if (!is_last()) send(out.detach(), s + 1, slot_name("activation", mb, s, s + 1), kActTag);
      inputs[m] = in;
      outputs[m] = out;
      stats_.max_in_flight =
          std::max(stats_.max_in_flight, static_cast<int64_t>(outputs.size()));
    } else {
      at::Tensor out = outputs.at(m);
      at::Tensor grad;
      if (!is_last()) {
        grad = receive(out.sizes().vec(), s + 1, slot_name("gradient", mb, s + 1, s), kGradTag);
      }
      const double start = now();
      if (cb.before_backward) cb.before_backward(m, m == last_backward);
      if (out.requires_grad()) {
        if (is_last()) {
          torch::autograd::backward({out});
        } else {
          torch::autograd::backward({out}, {grad});
        }
      }
      stats_.spans.push_back({mb, false, start, now()});
      if (!is_first()) {
        const at::Tensor& in = inputs.at(m);
        at::Tensor g = in.grad().defined() ? in.grad() : at::zeros_like(in);
        send(g, s - 1, slot_name("gradient", mb, s, s - 1), kGradTag);
      }
      inputs.erase(m);
      outputs.erase(m);
    }
  }
  for (auto& p : sends) p.wait();
}

}  // namespace ftune::parallel
