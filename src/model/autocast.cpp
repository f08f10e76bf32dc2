// Scoped autocast state; see autocast.h.
#include "model/autocast.h"

#include <ATen/autocast_mode.h>

namespace ftune::model {

AutocastScope::AutocastScope(at::DeviceType device, bool enabled, at::ScalarType dtype)
    : device_(device), enabled_(enabled) {
  prev_enabled_ = at::autocast::is_autocast_enabled(device_);
  prev_dtype_ = at::autocast::get_autocast_dtype(device_);
  at::autocast::set_autocast_enabled(device_, enabled);
  at::autocast::set_autocast_dtype(device_, dtype);
  if (enabled_) at::autocast::increment_nesting();
}

AutocastScope::~AutocastScope() {
  if (enabled_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_, prev_enabled_);
  at::autocast::set_autocast_dtype(device_, prev_dtype_);
}

}  // namespace ftune::model
