// The NF4 dequantization kernel for the baseline instruction set (see nf4_kernel.h).
#include "quant/nf4_kernel.h"

#define FTUNE_NF4_KERNEL_NAME dequant_blocks_default
#include "quant/nf4_kernel_impl.inc"
