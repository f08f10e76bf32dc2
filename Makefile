# ftune's two entry points (see README): `make test` and `make demo`. Both do the whole set-up on
# a fresh machine (apt packages, the pinned venv, configure, build) and skip what is already done.
BUILD ?= build
FUZZ_SECONDS ?= 600
# Object files keyed by paths relative to the clone, so every clone on a machine shares ccache hits.
export CCACHE_BASEDIR := $(CURDIR)
JOBS ?= $(shell nproc)
CTEST_ARGS ?=

.PHONY: setup configure build test test-slow test-asan demo fuzz clean

setup:
	@bash scripts/setup.sh

configure: setup
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null

build: configure
	@cmake --build $(BUILD) -j$(JOBS)

test: build
	ctest --test-dir $(BUILD) --output-on-failure -LE slow -j$(JOBS) $(CTEST_ARGS)

# The long tests: the real-model fine-tune, big-checkpoint loading, the fuzzers (30 s each).
test-slow: build
	ctest --test-dir $(BUILD) --output-on-failure -L slow $(CTEST_ARGS)

# The C++ unit tests (ctest label "unit", with the sanitizer canary) built with ASan + UBSan into
# build-asan (FTUNE_SANITIZE, cmake/sanitize.cmake; LibTorch stays uninstrumented), plus the pytests
# labelled "asan" that drive the instrumented ftune binary. Not part of `make test`: the first build
# takes about an hour on two cores. What runs and with which options: docs/testing.md.
ASAN_BUILD ?= build-asan
test-asan: setup
	@cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DFTUNE_SANITIZE=ON >/dev/null
	@cmake --build $(ASAN_BUILD) -j$(JOBS) --target unit_tests ftune adamw_tool
	ctest --test-dir $(ASAN_BUILD) --output-on-failure -L 'unit|asan' -LE slow -j$(JOBS) $(CTEST_ARGS)

demo: build
	@bash scripts/demo.sh

# libFuzzer on every reader of user files (clang, ASan + UBSan), FUZZ_SECONDS each, one at a time:
# gguf safetensors train_config jsonl tokenizer_json sentencepiece chat_template adapter.
fuzz: setup
	@bash scripts/fuzz.sh build build-fuzz
	@bash scripts/fuzz.sh run build-fuzz $(FUZZ_SECONDS) tests/fuzz/corpus all

clean:
	rm -rf $(BUILD)
