// Giving a tensor's memory back while it keeps its shape, dtype and autograd identity, and taking
// fresh memory for it again: how FSDP holds parameters between gathers and a pipeline stage drops
// the layers other stages own (their shapes still describe the exported model).
// Defines nbytes_of, free_storage, alloc_storage, owns_storage.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ftune::parallel {

int64_t nbytes_of(const at::Tensor& t);  // numel x element size
// The storage of `t` gives its memory back.
void free_storage(const at::Tensor& t);
// Fresh (uninitialized) memory for a freed storage, from its own allocator.
void alloc_storage(const at::Tensor& t);
// True when `t` alone spans its storage, contiguously, from offset 0, with an allocator (so its
// storage can be freed and reallocated); a view or a tensor over a file mapping is not.
bool owns_storage(const at::Tensor& t);

}  // namespace ftune::parallel
