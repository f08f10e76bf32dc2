# Test helpers. Every test gets a TIMEOUT so nothing can hang CI; label "slow" keeps a test out of
# the default suite (run it with `ctest -L slow`).
find_package(GTest REQUIRED)
include(GoogleTest)

# ftune_add_gtest(NAME SOURCES a.cpp b.cpp LIBS ftune_x [TIMEOUT s] [LABELS l])
function(ftune_add_gtest name)
  cmake_parse_arguments(A "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 120)
  endif()
  add_executable(${name} ${A_SOURCES})
  target_link_libraries(${name} PRIVATE ${A_LIBS} GTest::gtest GTest::gtest_main)
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES TIMEOUT ${A_TIMEOUT}
    ENVIRONMENT "FTUNE_BIN=$<TARGET_FILE:ftune>;FTUNE_SOURCE_DIR=${PROJECT_SOURCE_DIR}")
  # Every gtest also carries the label "unit" and joins the target unit_tests, so `make test-asan`
  # can build and run exactly the C++ unit tests (cmake --build --target unit_tests; ctest -L unit).
  list(PREPEND A_LABELS unit)
  set_tests_properties(${name} PROPERTIES LABELS "${A_LABELS}")
  set_property(TEST ${name} APPEND PROPERTY ENVIRONMENT ${FTUNE_SANITIZER_ENV})
  set_property(GLOBAL APPEND PROPERTY FTUNE_GTESTS ${name})
endfunction()

# ftune_add_pytest(NAME FILE tests/python/test_x.py [TIMEOUT s] [LABELS l] [ARGS pytest args...])
# Runs one pytest file with the venv's python against the built ftune binary (FTUNE_BIN); ARGS
# (e.g. -k "expr") select part of the file, so one file can feed a fast and a slow test.
# LABELS asan: `make test-asan` also runs it against the instrumented binary (it may need only
# ftune and adamw_tool, the drivers that target builds).
set(FTUNE_PYTHON "${PROJECT_SOURCE_DIR}/.venv/bin/python" CACHE FILEPATH "Python with the test oracles")
function(ftune_add_pytest name)
  cmake_parse_arguments(A "" "FILE;TIMEOUT" "LABELS;ARGS" ${ARGN})
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 300)
  endif()
  add_test(NAME ${name}
    COMMAND ${FTUNE_PYTHON} -m pytest -q -x -p no:cacheprovider ${PROJECT_SOURCE_DIR}/${A_FILE} ${A_ARGS}
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  set_tests_properties(${name} PROPERTIES TIMEOUT ${A_TIMEOUT}
    ENVIRONMENT "FTUNE_BIN=$<TARGET_FILE:ftune>;FTUNE_TOOLS_DIR=${PROJECT_BINARY_DIR}/bin;FTUNE_SOURCE_DIR=${PROJECT_SOURCE_DIR};PYTHONPATH=${PROJECT_SOURCE_DIR}/tests/python;OMP_NUM_THREADS=2;TOKENIZERS_PARALLELISM=false;HF_HUB_OFFLINE=1;TRANSFORMERS_OFFLINE=1")
  set_property(TEST ${name} APPEND PROPERTY ENVIRONMENT ${FTUNE_SANITIZER_ENV})
  if(A_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${A_LABELS}")
  endif()
endfunction()

# The libFuzzer targets, built with clang into build/fuzz once (fixture fuzz_build), then each run
# for FTUNE_FUZZ_SECONDS on the seeds (scripts/fuzz.sh). Labelled slow: `make test-slow` and CI.
set(FTUNE_FUZZ_SECONDS 30 CACHE STRING "Seconds each fuzzer runs in ctest")
set(_fuzz_sh ${PROJECT_SOURCE_DIR}/scripts/fuzz.sh)
add_test(NAME fuzz_build COMMAND bash ${_fuzz_sh} build ${PROJECT_BINARY_DIR}/fuzz)
# A cold build instruments ~40 LibTorch-including files on one job: allow an hour (ccache: minutes).
set_tests_properties(fuzz_build PROPERTIES TIMEOUT 3600 LABELS "slow;fuzz" FIXTURES_SETUP fuzz
  RESOURCE_LOCK fuzz_build_dir)
# One per reader of user files (tests/fuzz/CMakeLists.txt has the list).
foreach(_t gguf safetensors train_config jsonl tokenizer_json sentencepiece chat_template adapter)
  add_test(NAME fuzz_${_t} COMMAND bash ${_fuzz_sh} run ${PROJECT_BINARY_DIR}/fuzz
    ${FTUNE_FUZZ_SECONDS} ${PROJECT_BINARY_DIR}/fuzz/corpus ${_t})
  math(EXPR _timeout "${FTUNE_FUZZ_SECONDS} + 120")
  set_tests_properties(fuzz_${_t} PROPERTIES TIMEOUT ${_timeout} LABELS "slow;fuzz"
    FIXTURES_REQUIRED fuzz)
endforeach()
