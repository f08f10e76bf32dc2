#!/usr/bin/env bash
# Builds and runs the libFuzzer targets (clang, ASan + UBSan; see tests/fuzz/CMakeLists.txt) on the
# checked-in seeds plus a scratch corpus. `make fuzz` runs long sessions (corpus kept in the
# git-ignored tests/fuzz/corpus); ctest builds once (test fuzz_build) and runs each target for 30 s
# (tests fuzz_<target>; label "fuzz") so neither the targets nor the readers' robustness can rot
# unnoticed. Every seed in tests/fuzz/seeds/<target> (crash regressions included) is replayed first.
# Usage: scripts/fuzz.sh build BUILD_DIR
#        scripts/fuzz.sh run BUILD_DIR SECONDS CORPUS_DIR TARGET...
# TARGET: gguf safetensors train_config jsonl tokenizer_json sentencepiece chat_template adapter
# (the list in tests/fuzz/CMakeLists.txt; `all` runs each in turn).
# Exits non-zero when the build fails or a fuzzer reports a crash, timeout or sanitizer finding.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mode="${1:-}" build="${2:-}"
all_targets="gguf safetensors train_config jsonl tokenizer_json sentencepiece chat_template adapter"
case "$mode" in
  build)
    command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (scripts/setup.sh installs it)"; exit 1; }
    cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
      -DFTUNE_BUILD_FUZZERS=ON -DFTUNE_BUILD_TESTS=OFF >/dev/null
    cmake --build "$build" --target fuzzers
    ;;
  run)
    seconds="$3" corpus="$4"
    shift 4
    targets=("$@")
    [[ "${targets[*]}" == all ]] && targets=($all_targets)
    for t in "${targets[@]}"; do
      mkdir -p "$corpus/$t"
      echo "fuzz: $t for ${seconds}s"
      # A chat template may run up to its 1,000,000-step bound, ~35 s under the sanitizers on a
      # busy 2-core machine; longer than 60 s would be a finding.
      timeout=20
      [[ "$t" == chat_template ]] && timeout=60
      ASAN_OPTIONS=detect_leaks=0 "$build/bin/${t}_fuzz" -max_total_time="$seconds" \
        -rss_limit_mb=4096 -timeout="$timeout" -print_final_stats=1 -artifact_prefix="$corpus/$t-" \
        "$corpus/$t" "$root/tests/fuzz/seeds/$t"
    done
    ;;
  *) echo "usage: scripts/fuzz.sh build BUILD_DIR | run BUILD_DIR SECONDS CORPUS_DIR TARGET..."; exit 2 ;;
esac
