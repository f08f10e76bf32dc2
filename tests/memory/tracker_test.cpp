// The CPU tracker against byte counts known from the tensors' shapes and dtypes: what it counts
// live, its peak window, and that kernels needing the allocator's raw interface still work.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include "memory/tracker.h"

namespace ftune::memory {
namespace {

const c10::Device kCpu(c10::DeviceType::CPU);

class Tracker : public ::testing::Test {
 protected:
  void SetUp() override { install_cpu_tracker(); }
};

TEST_F(Tracker, CountsExactBytesOfLiveTensors) {
  const int64_t before = tensor_bytes(kCpu).live;
  {
    at::Tensor a = at::empty({1000}, at::kFloat);            // 4000 bytes
    at::Tensor b = at::empty({3, 7}, at::kDouble);           // 168
    at::Tensor v = a.view({10, 100}).slice(0, 2, 5);         // a view: no storage
    EXPECT_EQ(tensor_bytes(kCpu).live - before, 4000 + 168);
    at::Tensor c = a.to(at::kBFloat16);                      // a copy: 2000
    EXPECT_EQ(tensor_bytes(kCpu).live - before, 4000 + 168 + 2000);
  }
  EXPECT_EQ(tensor_bytes(kCpu).live, before);
}

TEST_F(Tracker, PeakWindowStartsAtReset) {
  reset_tensor_peak(kCpu);
  const int64_t base = tensor_bytes(kCpu).live;
  EXPECT_EQ(tensor_bytes(kCpu).peak, base);
  {
    at::Tensor big = at::zeros({1 << 20}, at::kFloat);  // 4 MiB
  }
  at::Tensor small = at::zeros({256}, at::kFloat);      // 1 KiB, still live
  EXPECT_EQ(tensor_bytes(kCpu).peak, base + (4 << 20));
  reset_tensor_peak(kCpu);
  EXPECT_EQ(tensor_bytes(kCpu).peak, base + 1024);
}

TEST_F(Tracker, AutogradSavedTensorsAreCounted) {
  // y = exp(x * w).sum(): mul saves x and w (already live) and its product dies once exp has run;
  // exp saves its output [n] for the backward. After the backward only x.grad [n] is new.
  const int64_t n = 1 << 16;
  at::Tensor x = at::randn({n}).requires_grad_(true);
  at::Tensor w = at::randn({n});
  const int64_t base = tensor_bytes(kCpu).live;
  at::Tensor y = (x * w).exp().sum();
  EXPECT_EQ(tensor_bytes(kCpu).live - base, 4 * n + 4);  // exp's output + the scalar
  y.backward();
  y.reset();
  EXPECT_EQ(tensor_bytes(kCpu).live - base, 4 * n);  // x.grad
}

TEST_F(Tracker, RawInterfaceWorks) {
  // Some kernels use raw_allocate/raw_deallocate, which require a "simple" data pointer.
  c10::Allocator* alloc = c10::GetCPUAllocator();
  const int64_t before = tensor_bytes(kCpu).live;
  void* p = alloc->raw_allocate(512);
  EXPECT_EQ(tensor_bytes(kCpu).live - before, 512);
  alloc->raw_deallocate(p);
  EXPECT_EQ(tensor_bytes(kCpu).live, before);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(at::empty({3}, at::kFloat).data_ptr()) % 64, 0u);
}

TEST_F(Tracker, ZeroSizedTensors) {
  const int64_t before = tensor_bytes(kCpu).live;
  at::Tensor e = at::empty({0}, at::kFloat);
  EXPECT_EQ(tensor_bytes(kCpu).live, before);
  EXPECT_EQ(e.numel(), 0);
}

}  // namespace
}  // namespace ftune::memory
