// Freeing and re-allocating tensor storage; see storage.h.
#include "parallel/storage.h"

#include <c10/core/StorageImpl.h>

namespace ftune::parallel {

int64_t nbytes_of(const at::Tensor& t) { return t.numel() * static_cast<int64_t>(t.element_size()); }

void free_storage(const at::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  s->set_data_ptr_noswap(at::DataPtr(nullptr, t.device()));
  s->set_nbytes(0);
}

void alloc_storage(const at::Tensor& t) {
  c10::StorageImpl* s = t.storage().unsafeGetStorageImpl();
  const auto n = static_cast<size_t>(nbytes_of(t));
  s->set_data_ptr_noswap(s->allocator()->allocate(n));
  s->set_nbytes(n);
}

bool owns_storage(const at::Tensor& t) {
  return t.is_contiguous() && t.storage_offset() == 0 &&
         static_cast<int64_t>(t.storage().nbytes()) == nbytes_of(t) &&
         t.storage().allocator() != nullptr && t.storage().resizable();
}

}  // namespace ftune::parallel
