// The counting CPU allocator: each allocation carries its size in a 64-byte header in front of the
// data (64 keeps c10's alignment), so the free is counted exactly with no lookup table and no lock.
// The DataPtr stays "simple" (context == data), as raw_allocate and some kernels require, which
// rules out wrapping the default allocator's own DataPtr; so it allocates with c10::alloc_cpu and
// frees with c10::free_cpu, as the default allocator does.
#include "memory/tracker.h"

#include <ATen/DeviceAccelerator.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstring>

namespace ftune::memory {
namespace {

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};

void raise_peak(int64_t now) {
  int64_t p = g_peak.load(std::memory_order_relaxed);
  while (now > p && !g_peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
  }
}

constexpr size_t kHeader = 64;

void free_counted(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  int64_t bytes = 0;
  std::memcpy(&bytes, base, sizeof(bytes));
  g_live.fetch_sub(bytes, std::memory_order_relaxed);
  c10::free_cpu(base);
}

class CountingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &free_counted, c10::Device(c10::DeviceType::CPU)};
    char* base = static_cast<char*>(c10::alloc_cpu(n + kHeader));
    const auto bytes = static_cast<int64_t>(n);
    std::memcpy(base, &bytes, sizeof(bytes));
    raise_peak(g_live.fetch_add(bytes, std::memory_order_relaxed) + bytes);
    void* data = base + kHeader;
    return {data, data, &free_counted, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_counted; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

bool g_installed = false;

}  // namespace

void install_cpu_tracker() {
  if (g_installed) return;
  // Leaked on purpose: tensors freed during static destruction still call through it.
  static auto* counting = new CountingAllocator();
  // Priority above the default allocator's so later registrations at default priority keep ours.
  c10::SetCPUAllocator(counting, /*priority=*/1);
  g_installed = true;
}

bool cpu_tracker_installed() { return g_installed; }

TensorBytes tensor_bytes(c10::Device device) {
  if (device.is_cuda()) {
    const auto stats = at::accelerator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return {static_cast<int64_t>(stats.allocated_bytes[0].current),
            static_cast<int64_t>(stats.allocated_bytes[0].peak)};  // StatType::AGGREGATE
  }
  return {g_live.load(std::memory_order_relaxed), g_peak.load(std::memory_order_relaxed)};
}

void reset_tensor_peak(c10::Device device) {
  if (device.is_cuda()) {
    at::accelerator::resetPeakStats(device.index() < 0 ? 0 : device.index());
    return;
  }
  g_peak.store(g_live.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

}  // namespace ftune::memory
