// The NF4 dequantization kernel compiled with -mavx2 -mfma (see nf4_kernel.h); only called when
// the CPU reports AVX2.
#include "quant/nf4_kernel.h"

#define FTUNE_NF4_KERNEL_NAME dequant_blocks_avx2
#include "quant/nf4_kernel_impl.inc"
