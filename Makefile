# ftune's two entry points (see README): `make test` and `make demo`. Both do the whole set-up on
# a fresh machine (apt packages, the pinned venv, configure, build) and skip what is already done.
BUILD ?= build
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

clean:
	rm -rf $(BUILD)
