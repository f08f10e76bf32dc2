// Pipeline parallelism's runtime for one stage (issue #10): runs the forward and backward slots
// of a round of M micro-batches in the order the schedule gives this stage (pipeline_schedule.h),
// receiving each activation from the previous stage and each output gradient from the next one,
// and sending its own on. Sends are started in the background and waited at the end of the round,
// so two neighbours that both send before they receive (1F1B's steady state) never deadlock;
// receives block, with the group's timeout, and a dead neighbour fails them naming its rank.
// The stage measures its slots (the timeline: start and end of each, from the step's start) and
// counts the micro-batches whose activations it holds. It knows nothing of the model: the
// caller's forward callback computes the stage's share (the last stage returns the loss).
// Defines StageCallbacks, StageSpan, StageStats, PipelineStage.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "parallel/pipeline_schedule.h"
#include "parallel/process_group.h"

namespace ftune::parallel {

struct StageCallbacks {
  // Micro-batch m's forward on this stage. `input` is the activation the previous stage sent
  // (it requires grad), undefined on the first stage. Returns the activation to send on; the
  // last stage returns the scalar loss its backward starts from.
  std::function<at::Tensor(int64_t m, const at::Tensor& input)> forward;
  // The shape of the activation this stage receives for micro-batch m (not called on the first).
  std::function<std::vector<int64_t>(int64_t m)> input_shape;
  // Right before micro-batch m's backward; `last` = the stage's last backward of the round.
  std::function<void(int64_t m, bool last)> before_backward;
};

// One slot as this stage ran it: seconds since begin_step(), compute only (the receive that
// precedes it is idle time).
struct StageSpan {
  int64_t micro_batch = 0;  // within the step (round * M + m)
  bool forward = true;
  double start = 0, end = 0;
};

struct StageStats {
  double begin_wall = 0;         // begin_step()'s wall-clock time (s since the epoch), to align
                                 // the stages' spans (exactly on one host; NTP-close across)
  std::vector<StageSpan> spans;  // this step's, in the order run
  int64_t max_in_flight = 0;     // most micro-batches whose activations were held at once
};

class PipelineStage {
 public:
  // `group`: the ranks of one pipeline, its group rank being the stage index.
  // `act_dtype`: the dtype of the activations between stages (the model's hidden dtype).
  PipelineStage(ProcessGroup& group, PipeSchedule schedule, at::ScalarType act_dtype,
                at::Device device);

  int64_t stage() const { return group_.rank(); }
  int64_t stages() const { return group_.size(); }
  bool is_first() const { return stage() == 0; }
  bool is_last() const { return stage() + 1 == stages(); }
  PipeSchedule schedule() const { return schedule_; }

  // Starts a step's timeline: a barrier over the pipeline, so every stage's clock starts at
  // (nearly) the same moment; clears the spans.
  void begin_step();
  // Every forward and backward of micro-batches 0..M-1 (numbered round * M + m in the
  // timeline), in this stage's schedule order. With train = false only the forwards run, in
  // order, under no_grad (evaluation).
  void run_round(int64_t round, int64_t micro_batches, const StageCallbacks& cb, bool train);
  const StageStats& stats() const { return stats_; }

 private:
  double now() const;

  ProcessGroup& group_;
  PipeSchedule schedule_;
  at::ScalarType act_dtype_;
  at::Device device_;
  std::chrono::steady_clock::time_point t0_;
  StageStats stats_;
};

}  // namespace ftune::parallel
