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

test-slow: build
	ctest --test-dir $(BUILD) --output-on-failure -L slow $(CTEST_ARGS)

demo: build
	@bash scripts/demo.sh

# libFuzzer on the GGUF and safetensors readers (clang, ASan + UBSan), FUZZ_SECONDS each.
fuzz: setup
	@cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DFTUNE_BUILD_FUZZERS=ON \
	  -DFTUNE_BUILD_TESTS=OFF >/dev/null
	@cmake --build build-fuzz --target gguf_fuzz safetensors_fuzz
	@for f in gguf safetensors; do mkdir -p tests/fuzz/corpus/$$f; \
	  ASAN_OPTIONS=detect_leaks=0 build-fuzz/bin/$${f}_fuzz -max_total_time=$(FUZZ_SECONDS) \
	    -rss_limit_mb=4096 -print_final_stats=1 tests/fuzz/corpus/$$f tests/fuzz/seeds/$$f; done

clean:
	rm -rf $(BUILD)
