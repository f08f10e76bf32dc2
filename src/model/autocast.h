// Scoped autocast state. Training enables bf16 autocast over fp32 master weights with it, and
// activation checkpointing replays a layer in backward under the state its forward saw (as
// torch.utils.checkpoint does), so recomputed activations match the stored ones bit for bit.
#pragma once

#include <ATen/ATen.h>

namespace ftune::model {

// Sets autocast for `device` to (enabled, dtype) in scope and restores the previous state after.
// When enabling, it also clears the cast-weight cache as the outermost scope ends (as torch.autocast
// does), so a scope never sees casts of weights from before an optimizer step.
class AutocastScope {
 public:
  AutocastScope(at::DeviceType device, bool enabled, at::ScalarType dtype = at::kBFloat16);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType device_;
  bool enabled_;
  bool prev_enabled_;
  at::ScalarType prev_dtype_;
};

}  // namespace ftune::model
