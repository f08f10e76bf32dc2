# FTUNE_SANITIZE=ON (make test-asan): ASan + UBSan on every target ftune compiles (its libraries,
# the binary, the tests and tools); the imported LibTorch and the system GTest stay as shipped,
# uninstrumented. -O1 -g1 keeps stacks readable (line tables) at a fraction of -O0's run time and
# -g's build time; -fno-sanitize-recover makes any UBSan report fail the test, not scroll by.
# Defines FTUNE_SANITIZER_ENV: the run-time options every ctest test gets (cmake/testing.cmake).
set(_ftune_san -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:${_ftune_san};-O1;-g1>")
# HOST_LINK: not the nvcc device-link step of the CUDA kernel (src/quant), which rejects it; one
# flag per sanitizer because a comma inside $<...> splits the flag.
add_link_options("$<HOST_LINK:-fsanitize=address;-fsanitize=undefined>")
message(STATUS "ftune: ASan + UBSan build (FTUNE_SANITIZE)")

# Stricter than the defaults, and nothing suppressed: leak checking stays on (LibTorch's registries
# stay reachable from its globals, so LSan reports none of them), no ASan/UBSan check is disabled.
set(FTUNE_SANITIZER_ENV
  "ASAN_OPTIONS=strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
  "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
