// NF4 4-bit quantization as bitsandbytes and QLoRA define it (../shared/REFERENCE.md §3), in
// bitsandbytes' exact layout and arithmetic, so a tensor ftune quantizes has the bytes
// bitsandbytes' CPU quantize_4bit(quant_type="nf4") gives, and a checkpoint either writes loads in
// the other. Trade-off: the weight stays packed (4.127 bits/param with double quantization) and is
// dequantized for every matmul, forward and backward (nf4_linear), trading compute for memory.
// Defines QuantOptions, Nf4Tensor, quantize/dequantize (a vectorized, multi-threaded CPU kernel
// and a scalar reference), the bitsandbytes key layout, and the 4-bit linear.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace ftune::quant {

struct QuantOptions {
  std::string type = "nf4";      // the only type: NormalFloat4
  bool double_quant = true;      // quantize the absmax too (blocks of 256, 8-bit dynamic map)
  int64_t blocksize = 64;        // elements per absmax
  at::ScalarType compute_dtype = at::kBFloat16;  // dtype the weight is dequantized to for matmuls
};

// Throws "<origin>.<field>: ..." for a type other than nf4, a blocksize other than 64 or a compute
// dtype other than fp32/bf16 (origin "quant" gives "quant.type: 'fp4' ...: expected nf4").
void validate(const QuantOptions& o, const std::string& origin);

constexpr int64_t kNestedBlocksize = 256;  // bitsandbytes' blocksize for the absmax's own absmax

// The NF4 code table, index 0..15 (REFERENCE.md §3).
const std::array<float, 16>& nf4_code();
// bitsandbytes' create_dynamic_map(signed=True) with entry 0 set to -1.0, as its CPU blockwise
// quantizer leaves it (and so writes it to nested_quant_map): fp32 [256].
at::Tensor dynamic_map();

// A weight in NF4, laid out as bitsandbytes' Params4bit + QuantState hold it.
struct Nf4Tensor {
  at::Tensor packed;            // uint8 [ceil(n / 2)]: element 2i in the high nibble, 2i+1 low
  at::Tensor absmax;            // fp32 [nblocks], or uint8 [nblocks] with double quantization
  at::Tensor nested_absmax;     // fp32 [ceil(nblocks / 256)]; undefined without double quant
  at::Tensor nested_quant_map;  // fp32 [256] (dynamic_map()); undefined without double quant
  float offset = 0;             // mean of the fp32 absmax, subtracted before its quantization
  at::Tensor quant_map;         // fp32 [16], nf4_code()
  std::vector<int64_t> shape;   // of the original weight, e.g. [out, in]
  at::ScalarType dtype = at::kFloat;  // of the original weight (fp32, bf16 or fp16)
  int64_t blocksize = 64;
  int64_t nested_blocksize = kNestedBlocksize;

  bool double_quant() const { return nested_absmax.defined(); }
  int64_t numel() const;
  int64_t nblocks() const { return (numel() + blocksize - 1) / blocksize; }
  // Bytes held: packed + absmax + nested absmax + nested map + quant map + offset.
  int64_t nbytes() const;
  at::Device device() const { return packed.device(); }
  Nf4Tensor to(at::Device device) const;  // same values on `device`
};

// Quantizes `w` (fp32, bf16 or fp16, any device, an even number of elements) with bitsandbytes'
// CPU algorithm: per block absmax = max|x|, index = nearest code to x * (1 / absmax) (ties to the
// lower index; an all-zero block gets index 0, as bitsandbytes gives), with double quantization
// the absmax minus its mean quantized in blocks of 256 with dynamic_map() (nearest, ties lower).
// The result lives on w's device. Throws "quantize_nf4: ..." for a non-finite value.
Nf4Tensor quantize_nf4(const at::Tensor& w, const QuantOptions& o = {});

// The absmax per block as fp32 [nblocks]: absmax itself, or with double quantization
// nested_quant_map[absmax] * nested_absmax[block / 256] + offset (bitsandbytes' order).
at::Tensor dequantize_absmax(const Nf4Tensor& t);

// The weight in `dtype` (fp32, bf16 or fp16), shape t.shape, exactly as bitsandbytes'
// dequantize_4bit computes it: dtype(dtype(code[q]) * absmax). CPU: a vectorized kernel over
// blocks split across at::parallel_for threads; CUDA tensors use the CUDA kernel when built in.
at::Tensor dequantize_nf4(const Nf4Tensor& t, at::ScalarType dtype);
// The same values from a plain scalar loop, for tests of the kernels (CPU only).
at::Tensor dequantize_nf4_reference(const Nf4Tensor& t, at::ScalarType dtype);

// bitsandbytes' serialized layout for a weight `prefix` (e.g. "model.layers.0.mlp.up_proj.weight"):
// prefix -> packed as uint8 [ceil(n / 2), 1], prefix.absmax, prefix.quant_map,
// prefix.nested_absmax, prefix.nested_quant_map (double quant only), and
// prefix.quant_state.bitsandbytes__nf4 (uint8 UTF-8 JSON with quant_type, blocksize, dtype,
// shape[, nested_blocksize, nested_dtype, nested_offset]), byte for byte what
// QuantState.as_dict(packed=True) gives. CPU tensors, in that order.
std::vector<std::pair<std::string, at::Tensor>> to_bnb_tensors(const Nf4Tensor& t,
                                                               const std::string& prefix);
// The key suffixes of that layout after `prefix` ("" for the packed weight itself).
std::vector<std::string> bnb_key_suffixes(bool double_quant);
// True when `name` is one of those keys for some prefix other than the packed weight itself.
bool is_bnb_state_key(const std::string& name);

// Reads the tensors of that layout through `get` (full key -> CPU tensor; undefined when absent)
// and validates every one (dtype, shape, JSON fields, sizes agreeing with each other); errors are
// "<origin>: <key>: <what was expected>". `expected_shape` (if not empty) must equal the JSON's.
using TensorGetter = std::function<at::Tensor(const std::string& key)>;
Nf4Tensor from_bnb_tensors(const TensorGetter& get, const std::string& prefix,
                           const std::string& origin,
                           const std::vector<int64_t>& expected_shape = {});

// y = x @ W^T + bias with W in NF4 (bitsandbytes' Linear4bit): x and bias are cast to
// compute_dtype, W is dequantized to its original dtype and cast to compute_dtype, the output is
// cast back to x's dtype. An autograd function: backward dequantizes W again for grad_x (W is
// frozen and gets no gradient; bias gets one if it requires it). Nothing full-precision is saved
// between forward and backward, only references to `w`'s packed tensors.
at::Tensor nf4_linear(const at::Tensor& x, const Nf4Tensor& w, const at::Tensor& bias,
                      at::ScalarType compute_dtype);

}  // namespace ftune::quant
