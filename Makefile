# ftune's two entry points (see README): `make test` and `make demo`. Both do the whole set-up on
# a fresh machine (apt packages, the pinned venv, configure, build) and skip what is already done.
BUILD ?= build
FUZZ_SECONDS ?= 600
# Object files keyed by paths relative to the clone, so every clone on a machine shares ccache hits.
export CCACHE_BASEDIR := $(CURDIR)
JOBS ?= $(shell nproc)
CTEST_ARGS ?=

.PHONY: setup configure build test test-slow demo fuzz clean

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

demo: build
	@bash scripts/demo.sh

# libFuzzer on every reader of user files (clang, ASan + UBSan), FUZZ_SECONDS each, one at a time:
# gguf safetensors train_config jsonl tokenizer_json sentencepiece chat_template adapter.
fuzz: setup
	@bash scripts/fuzz.sh build build-fuzz
	@bash scripts/fuzz.sh run build-fuzz $(FUZZ_SECONDS) tests/fuzz/corpus all

clean:
	rm -rf $(BUILD)
