// Pipeline parallelism's pure logic (issue #10), with no process group: which layers each stage
// owns, and in which order each stage runs the forward and backward slots of M micro-batches
// under the naive, GPipe and 1F1B schedules. simulate() plays the schedule on an ideal machine
// (a slot starts when its stage is free and its input exists) to give the timeline, the bubble
// fraction and the activations each stage holds at most, which the runtime's measured timeline
// is compared with. Defines PipeSchedule, PipeSlot, PipeTimeline and the functions on them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ftune::parallel {

enum class PipeSchedule {
  kNaive,  // one micro-batch at a time: its forward through every stage, then its backward
  kGPipe,  // every micro-batch's forward, then every backward (all activations held)
  k1F1B,   // warm-up forwards, then one forward / one backward alternating, then the cool-down
};

// "naive" | "gpipe" | "1f1b"; throws naming `where` otherwise.
PipeSchedule parse_pipe_schedule(const std::string& name, const std::string& where);
const char* pipe_schedule_name(PipeSchedule s);

struct PipeSlot {
  bool forward = true;
  int64_t micro_batch = 0;
  bool operator==(const PipeSlot&) const = default;
};

// The slots stage `stage` (0 = first) of `stages` runs, in order: every micro-batch's forward
// and backward once each.
std::vector<PipeSlot> stage_order(PipeSchedule s, int64_t stage, int64_t stages,
                                  int64_t micro_batches);

// Contiguous layer blocks for `parts` stages, as split points [0, b1, ..., n]: stage k owns
// layers [split[k], split[k + 1]). Balanced by `costs` (one per layer, e.g. parameter counts):
// the largest block's cost is the least possible (ties: earlier stages take fewer layers). Every
// stage gets at least one layer; throws when there are fewer layers than parts.
std::vector<int64_t> balanced_split(const std::vector<int64_t>& costs, int64_t parts);
// Checks a user's split (parallel.split) for `layers` layers and `parts` stages: strictly
// increasing from 0 to layers. Throws naming `where`.
void check_split(const std::vector<int64_t>& split, int64_t layers, int64_t parts,
                 const std::string& where);

struct PipeTimeline {
  struct Span {
    int64_t stage;
    PipeSlot slot;
    double start, end;
  };
  std::vector<Span> spans;           // every slot of every stage, in the order each stage ran it
  double makespan = 0;               // end of the last slot
  std::vector<double> busy;          // per stage: sum of its slots' durations
  std::vector<int64_t> max_in_flight;  // per stage: most micro-batches forwarded, not yet backward
  double bubble() const;             // idle share of stages x makespan
};

// Plays stage_order on an ideal machine: a forward of micro-batch m on stage s waits for stage
// s - 1's forward of m, a backward for stage s + 1's backward of m (and its own forward); a stage
// runs one slot at a time. Forward slots take `forward_s`, backward `backward_s` (equal costs per
// stage). Throws when the orders deadlock (a schedule bug).
PipeTimeline simulate(PipeSchedule s, int64_t stages, int64_t micro_batches,
                      double forward_s = 1.0, double backward_s = 2.0);

// GPipe's bubble with equal stages: (P - 1) / (M + P - 1).
double theoretical_bubble(int64_t stages, int64_t micro_batches);

}  // namespace ftune::parallel
