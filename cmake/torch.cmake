# Locates LibTorch and defines the imported target ftune::torch.
# Default: the torch wheel in the project venv (.venv), used directly from its include/ and lib/
# folders. Linking the wheel's libraries by hand avoids TorchConfig's CUDA-toolkit probing (which
# breaks on CUDA >= 12.9 with the missing CUDA::nvToolsExt target) and works for CPU and CUDA wheels
# alike. -DFTUNE_TORCH_ROOT=/path/to/libtorch (or a site-packages/torch folder) picks another one;
# -DFTUNE_TORCH_FIND_PACKAGE=ON with -DCMAKE_PREFIX_PATH uses TorchConfig.cmake instead.
option(FTUNE_TORCH_FIND_PACKAGE "Use find_package(Torch) instead of the direct wheel layout" OFF)
set(FTUNE_TORCH_ROOT "" CACHE PATH "LibTorch root (has include/ and lib/); default: the venv's torch")

add_library(ftune_torch INTERFACE)
add_library(ftune::torch ALIAS ftune_torch)

# ftune::openmp, for sources that call at::parallel_for: it is inline OpenMP code
# (ATen/ParallelOpenMP.h), so a file built without -fopenmp runs it on one thread. With the wheel,
# the rpath below resolves libgomp.so.1 to the wheel's own copy: one OpenMP runtime, the one
# at::set_num_threads sets.
add_library(ftune_openmp INTERFACE)
add_library(ftune::openmp ALIAS ftune_openmp)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  target_compile_options(ftune_openmp INTERFACE -fopenmp)
  target_link_options(ftune_openmp INTERFACE -fopenmp)
endif()

if(FTUNE_TORCH_FIND_PACKAGE)
  if(NOT TARGET CUDA::nvToolsExt AND EXISTS /usr/local/cuda/include/nvtx3)
    add_library(CUDA::nvToolsExt INTERFACE IMPORTED)
    set_target_properties(CUDA::nvToolsExt PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES /usr/local/cuda/include)
  endif()
  find_package(Torch REQUIRED)
  target_link_libraries(ftune_torch INTERFACE ${TORCH_LIBRARIES})
  separate_arguments(_tflags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
  target_compile_options(ftune_torch INTERFACE ${_tflags})
  set(FTUNE_TORCH_HAS_CUDA ${TORCH_CUDA_LIBRARIES})
  return()
endif()

if(NOT FTUNE_TORCH_ROOT)
  set(_py "${PROJECT_SOURCE_DIR}/.venv/bin/python")
  if(NOT EXISTS ${_py})
    message(FATAL_ERROR "ftune: no LibTorch: run scripts/setup.sh (or `make test`) to create .venv, "
                        "or pass -DFTUNE_TORCH_ROOT=/path/to/libtorch")
  endif()
  execute_process(COMMAND ${_py} -c "import os, torch; print(os.path.dirname(torch.__file__))"
                  OUTPUT_VARIABLE FTUNE_TORCH_ROOT OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "ftune: ${_py} cannot import torch")
  endif()
endif()
if(NOT EXISTS ${FTUNE_TORCH_ROOT}/include/torch/csrc/api/include)
  message(FATAL_ERROR "ftune: ${FTUNE_TORCH_ROOT} is not a LibTorch root (no include/torch)")
endif()
message(STATUS "ftune: LibTorch at ${FTUNE_TORCH_ROOT}")

# The wheels since 2.x are built with the C++11 ABI; read it from the headers' build config.
set(_abi 1)
file(GLOB _cfg ${FTUNE_TORCH_ROOT}/share/cmake/Torch/TorchConfig.cmake)
if(_cfg)
  file(READ ${_cfg} _cfg_text)
  if(_cfg_text MATCHES "_GLIBCXX_USE_CXX11_ABI=0")
    set(_abi 0)
  endif()
endif()

set(_libdir ${FTUNE_TORCH_ROOT}/lib)
set(_libs ${_libdir}/libtorch.so ${_libdir}/libtorch_cpu.so ${_libdir}/libc10.so)
set(FTUNE_TORCH_HAS_CUDA OFF)
if(EXISTS ${_libdir}/libtorch_cuda.so)
  set(FTUNE_TORCH_HAS_CUDA ON)
  # --no-as-needed: nothing references libtorch_cuda symbols directly, but loading it registers
  # the CUDA dispatch keys; without it at::kCUDA tensors fail at run time.
  list(APPEND _libs "-Wl,--no-as-needed" ${_libdir}/libtorch_cuda.so ${_libdir}/libc10_cuda.so
       "-Wl,--as-needed")
endif()
target_include_directories(ftune_torch SYSTEM INTERFACE
  ${FTUNE_TORCH_ROOT}/include ${FTUNE_TORCH_ROOT}/include/torch/csrc/api/include)
target_compile_definitions(ftune_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_abi})
# The wheel's libtorch.so exports its own copy of some std::filesystem symbols; libstdc++ must come
# first in the dynamic-library order or fs::remove_all & co resolve into torch's copy and crash.
target_link_libraries(ftune_torch INTERFACE "-Wl,--push-state,--no-as-needed" stdc++ "-Wl,--pop-state"
                      ${_libs} Threads::Threads)
target_link_options(ftune_torch INTERFACE "-Wl,-rpath,${_libdir}")
if(FTUNE_TORCH_HAS_CUDA)
  target_compile_definitions(ftune_torch INTERFACE FTUNE_TORCH_CUDA=1)
endif()
