// The CUDA NF4 dequantization kernel against the CPU scalar reference, bit for bit, through its
// raw-pointer launcher (so it runs with any torch, CPU-only included). Exits 77 (ctest: skipped)
// with a message when no GPU is present.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "quant/nf4.h"
#include "quant/nf4_cuda.h"

namespace {
using namespace ftune;

template <typename T>
T* upload(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  at::Tensor c = t.contiguous();
  void* p = nullptr;
  if (cudaMalloc(&p, c.nbytes()) != cudaSuccess) return nullptr;
  cudaMemcpy(p, c.data_ptr(), c.nbytes(), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

int check(const char* what, const std::vector<int64_t>& shape, bool dq, at::ScalarType out_dtype) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(42);
  at::Tensor w = at::randn(shape, gen, at::kFloat).mul_(0.05);
  quant::QuantOptions o;
  o.double_quant = dq;
  quant::Nf4Tensor t = quant::quantize_nf4(w, o);
  at::Tensor ref = quant::dequantize_nf4_reference(t, out_dtype);
  quant::cuda::Nf4DeviceArgs a;
  a.packed = upload<uint8_t>(t.packed);
  if (dq) {
    a.absmax_u8 = upload<uint8_t>(t.absmax);
    a.nested_absmax = upload<float>(t.nested_absmax);
    a.nested_quant_map = upload<float>(t.nested_quant_map);
    a.offset = t.offset;
  } else {
    a.absmax_f32 = upload<float>(t.absmax);
  }
  at::Tensor code = t.quant_map.to(out_dtype).to(at::kFloat);
  std::memcpy(a.code, code.data_ptr<float>(), sizeof(a.code));
  a.n = t.numel();
  a.blocksize = t.blocksize;
  void* out = nullptr;
  cudaMalloc(&out, ref.nbytes());
  const bool bf16 = out_dtype == at::kBFloat16;
  int err = quant::cuda::launch_dequantize_nf4(
      a, out, bf16 ? quant::cuda::OutDtype::kBF16 : quant::cuda::OutDtype::kF32, nullptr);
  if (err == 0) err = static_cast<int>(cudaDeviceSynchronize());
  if (err != 0) {
    std::printf("FAIL %s: %s\n", what, quant::cuda::cuda_error_string(err));
    return 1;
  }
  at::Tensor got = at::empty_like(ref);
  cudaMemcpy(got.data_ptr(), out, ref.nbytes(), cudaMemcpyDeviceToHost);
  const bool same = std::memcmp(got.data_ptr(), ref.data_ptr(), ref.nbytes()) == 0;
  std::printf("%s %s: %lld elements, %s\n", same ? "ok" : "FAIL", what,
              static_cast<long long>(ref.numel()), bf16 ? "bf16" : "fp32");
  return same ? 0 : 1;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device (the CUDA NF4 kernel compiled and linked, not run)\n");
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s\n", prop.name);
  int fails = 0;
  fails += check("double quant", {4096, 1024}, true, at::kBFloat16);
  fails += check("double quant", {4096, 1024}, true, at::kFloat);
  fails += check("plain absmax", {172, 64}, false, at::kBFloat16);
  fails += check("partial block", {100, 2}, true, at::kFloat);
  return fails ? 1 : 0;
}
