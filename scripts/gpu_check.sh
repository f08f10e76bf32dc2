#!/usr/bin/env bash
# The one prepared GPU check of issue 13, for the device machine (one H200, 16 cores, CUDA 13,
# PyTorch 2.11 in its python3, no network), run from the repository root; under 8 minutes.
# Phases, each time-limited so one failure cannot eat the window; a failed phase is reported and
# the next one still runs (those that need a build are skipped without one):
#   env        what the machine has: GPU, nvcc, compilers, cmake/ninja, python packages, disk
#   deps       the build's Debian -dev packages (dpkg -s); any missing come from .gpu-deps/debs
#              (scripts/gpu_deps.sh, carried), unpacked with dpkg -x into a private prefix;
#              bitsandbytes from .gpu-deps/py when python3 has none. Missing and not carried:
#              the exact list is printed and the build is skipped (no network: nothing can be
#              fetched there, FetchContent included).
#   configure  cmake -B build-gpu against python3's own torch (-DFTUNE_TORCH_ROOT), CUDA on:
#              the NF4 kernel (nvcc, sm_90) and the NCCL process group must both be found
#   build      the GPU tests' targets with all cores
#   test       ctest -L gpu (tests/python/test_gpu.py, nf4_cuda, process_group_cuda_test,
#              device_test)
#   bench      bench/gpu.sh until the time budget runs out (the cases not reached run on a rerun)
# Logs go to $OUT (the device tool's folder; 8 files at most come back) or runs/gpu_check/:
# gpu_check.log (all), env.txt, build.log (configure too), ctest.log, bench.log, bench.md,
# results.jsonl, summary.md (the phase table and the parity numbers each test printed). The
# summary table is printed last.
# Usage: bash scripts/gpu_check.sh           (env GPU_CHECK_BUDGET=470 seconds in all,
#        GPU_CHECK_PHASES="env deps configure build test bench", PYTHON=python3, JOBS=nproc)
#   A rerun on the still-warm machine keeps build-gpu/ and runs/gpu_bench/ (both git-ignored):
#   GPU_CHECK_PHASES="deps configure build bench" finishes the benchmarks in a few minutes.
#   --dry-run, on a machine without a GPU: the same phases with the venv's python, the GPU tests
#   skipping and the bench in bench/gpu.sh's --dry-run mode (a check of this script).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$(date +%s)
DRY=0
[ "${1:-}" = --dry-run ] && DRY=1
BUDGET=${GPU_CHECK_BUDGET:-$( ((DRY)) && echo 1500 || echo 470)}
PHASES=${GPU_CHECK_PHASES:-env deps configure build test bench}
PY=${PYTHON:-$( ((DRY)) && echo .venv/bin/python || echo python3)}
JOBS=${JOBS:-$(nproc)}
B=build-gpu
L=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$L"
exec > >(tee -a "$L/gpu_check.log") 2>&1
declare -A STATUS NOTE SECS
ORDER=()

left() { echo $((T0 + BUDGET - $(date +%s))); }
say() { echo "[gpu_check $(($(date +%s) - T0))s] $*"; }
# phase NAME LIMIT_S FUNCTION: runs FUNCTION under a time limit (or the budget left, if less);
# its exit status 0 = ok, 2 = skipped, other = failed; it may set NOTE[NAME].
phase() {
  local name=$1 limit=$2 fn=$3 t rc
  [[ " $PHASES " == *" $name "* ]] || return 0
  ORDER+=("$name")
  ((limit > $(left))) && limit=$(left)
  if ((limit < 10)); then STATUS[$name]=skipped; NOTE[$name]="out of time"; SECS[$name]=0; return 0; fi
  say "=== $name (limit ${limit}s)"
  t=$(date +%s)
  PHASE_LIMIT=$limit "$fn"
  rc=$?
  SECS[$name]=$(($(date +%s) - t))
  case $rc in
    0) STATUS[$name]=ok ;;
    2) STATUS[$name]=skipped ;;
    124 | 137) STATUS[$name]="timed out" ;;
    *) STATUS[$name]="failed ($rc)" ;;
  esac
  say "=== $name: ${STATUS[$name]} in ${SECS[$name]}s ${NOTE[$name]:-}"
}

# --- env ---------------------------------------------------------------------------------------
do_env() {
  {
    echo "date: $(date -u +%FT%TZ); host: $(uname -srm); cpus: $(nproc)"
    echo "memory: $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB total, " $7 " GiB available"}')"
    echo "disk: $(df -h . | awk 'NR==2{print $4 " free of " $2}')"
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
      --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    for t in nvcc g++ c++ gcc cmake ninja pkg-config ccache dpkg; do
      if command -v "$t" >/dev/null; then
        echo "$t: $("$t" --version 2>&1 | grep -m1 -iE 'release|[0-9]+\.[0-9]+')"
      else
        echo "$t: MISSING"
      fi
    done
    echo "python: $(command -v "$PY") $($PY --version 2>&1)"
    timeout 60 $PY - <<'PYEOF' 2>&1
import importlib, importlib.metadata as md
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors",
             "tokenizers", "pytest", "numpy"):
    try:
        print(f"{name}: {md.version(name)}")
    except Exception as e:
        print(f"{name}: MISSING")
import torch
print("torch.cuda:", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("torch root:", torch.__path__[0])
PYEOF
  } | tee "$L/env.txt"
  NOTE[env]="$(grep -m1 '^gpu:' "$L/env.txt" | cut -c6-)"
  timeout 60 $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    { NOTE[env]="torch sees no GPU"; ((DRY)) && return 0; return 1; }
}

# --- deps --------------------------------------------------------------------------------------
DEPS_PREFIX=/tmp/ftune-gpu-deps
DEV_PKGS=(libsentencepiece-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libgtest-dev
          libpcre2-dev libgloo-dev)
CMAKE_EXTRA=()
do_deps() {
  local missing=() p
  for p in "${DEV_PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  # GPU_CHECK_DEPS=carried uses the carried packages even where the machine has its own (a test
  # of this fallback on a machine that has them all).
  [ "${GPU_CHECK_DEPS:-}" = carried ] && ((${#missing[@]} == 0)) && missing=("(forced)")
  if ((${#missing[@]})); then
    say "missing here: ${missing[*]}"
    if ! ls .gpu-deps/debs/*.deb >/dev/null 2>&1; then
      NOTE[deps]="missing ${missing[*]}; .gpu-deps/debs not carried (run scripts/gpu_deps.sh"
      NOTE[deps]+=" on the CPU machine, then carry .gpu-deps)"
      return 1
    fi
    rm -rf "$DEPS_PREFIX" && mkdir -p "$DEPS_PREFIX"
    for p in .gpu-deps/debs/*.deb; do dpkg -x "$p" "$DEPS_PREFIX" || return 1; done
    # The .pc files say prefix=/usr: point them at the private prefix.
    sed -i "s|^prefix=/usr\$|prefix=$DEPS_PREFIX/usr|" "$DEPS_PREFIX"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc \
      "$DEPS_PREFIX"/usr/share/pkgconfig/*.pc
    export PATH="$DEPS_PREFIX/usr/bin:$PATH"
    export LD_LIBRARY_PATH="$DEPS_PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PKG_CONFIG_PATH="$DEPS_PREFIX/usr/lib/x86_64-linux-gnu/pkgconfig:$DEPS_PREFIX/usr/share/pkgconfig"
    export CPLUS_INCLUDE_PATH="$DEPS_PREFIX/usr/include"  # Gloo's headers (no CMake target)
    CMAKE_EXTRA=(-DCMAKE_PREFIX_PATH="$DEPS_PREFIX/usr" -DPKG_CONFIG_EXECUTABLE="$DEPS_PREFIX/usr/bin/pkgconf")
    NOTE[deps]="from .gpu-deps: ${missing[*]}"
  else
    NOTE[deps]="all -dev packages installed"
  fi
  if ! $PY -c 'import bitsandbytes' >/dev/null 2>&1; then
    if [ -f .gpu-deps/py/bitsandbytes/__init__.py ]; then
      echo "$ROOT/.gpu-deps/py" >"$($PY -c 'import site; print(site.getsitepackages()[0])')/ftune-gpu-deps.pth"
      NOTE[deps]+="; bitsandbytes from .gpu-deps"
    else
      NOTE[deps]+="; no bitsandbytes (QLoRA peers and checks will skip)"
    fi
  fi
  timeout 60 $PY - <<'PYEOF' || NOTE[deps]+="; bitsandbytes does not run on the GPU"
import torch, bitsandbytes.functional as F
q, s = F.quantize_4bit(torch.randn(128, 64, device="cuda"), quant_type="nf4")
print("bitsandbytes on the GPU: ok,", F.dequantize_4bit(q, s).shape)
PYEOF
  return 0
}

# --- configure and build -----------------------------------------------------------------------
do_configure() {
  local torch_root
  torch_root=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))') || return 1
  timeout -k 5 "$PHASE_LIMIT" cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DFTUNE_TORCH_ROOT="$torch_root" -DFTUNE_PYTHON="$(command -v "$PY")" \
    -DCMAKE_CUDA_ARCHITECTURES=90 "${CMAKE_EXTRA[@]}" >/tmp/ftune-configure.log 2>&1
  local rc=$?
  cat /tmp/ftune-configure.log >>"$L/build.log"
  grep -E "^-- ftune" /tmp/ftune-configure.log
  ((rc == 0)) || { NOTE[configure]="$(grep -m1 -E 'Error|error' /tmp/ftune-configure.log)"; return $rc; }
  local k n
  k=$(grep -c "CUDA NF4 kernel with" /tmp/ftune-configure.log)
  n=$(grep -c "ftune: NCCL process group" /tmp/ftune-configure.log)
  NOTE[configure]="CUDA NF4 kernel: $( ((k)) && echo yes || echo NO); NCCL: $( ((n)) && echo yes || echo NO)"
  ((k && n)) || return 1
}

do_build() {
  [ -f "$B/build.ninja" ] || { NOTE[build]="not configured"; return 2; }
  local targets=(ftune model_tool quant_tool device_test process_group_cuda_test nf4_cuda_test) have=()
  local t
  for t in "${targets[@]}"; do  # nf4_cuda_test exists only when nvcc was found
    grep -q "^build $t: phony" "$B/build.ninja" && have+=("$t")
  done
  ((${#have[@]})) || { NOTE[build]="none of the targets in $B/build.ninja"; return 1; }
  timeout -k 5 "$PHASE_LIMIT" cmake --build "$B" -j "$JOBS" --target "${have[@]}" >>"$L/build.log" 2>&1
  local rc=$?
  NOTE[build]="targets: ${have[*]}"
  ((rc == 0)) || NOTE[build]="$(grep -m1 -E 'error|Error' "$L/build.log" | cut -c1-200)"
  return $rc
}

# --- tests -------------------------------------------------------------------------------------
do_test() {
  [ -x "$B/bin/ftune" ] || { NOTE[test]="no build"; return 2; }
  timeout -k 10 "$PHASE_LIMIT" ctest --test-dir "$B" -L gpu --output-on-failure -V \
    >"$L/ctest.log" 2>&1
  local rc=$?
  grep -E "^ *[0-9]+/[0-9]+ Test|tests passed|Skipped|Failed|Not Run" "$L/ctest.log" | tail -20
  # the measured parity numbers each test printed
  grep -E "cuda fp32|cuda bf16|vs PEFT|\(NCCL|peak_mem_bytes|eval nll|differing from" \
    "$L/ctest.log" | sed 's/^[0-9]*: //' | sort -u | tee /tmp/ftune-parity.txt
  NOTE[test]="$(grep -m1 'tests passed' "$L/ctest.log")"
  return $rc
}

# --- bench -------------------------------------------------------------------------------------
do_bench() {
  [ -x "$B/bin/ftune" ] || { NOTE[bench]="no build"; return 2; }
  local bd=runs/gpu_bench args=()
  ((DRY)) && { bd=runs/gpu_bench_dry; args=(--dry-run); }
  BENCH_DEADLINE=$((T0 + BUDGET - 15)) FTUNE_BIN="$B/bin/ftune" PYTHON="$PY" BENCH_DIR=$bd \
    timeout -k 10 "$PHASE_LIMIT" bash bench/gpu.sh "${args[@]}" >"$L/bench.log" 2>&1
  local rc=$?
  grep "^\[gpu.sh" "$L/bench.log" | tail -30
  cp "$bd/results.jsonl" "$L/results.jsonl" 2>/dev/null
  cp "$bd/table.md" "$L/bench.md" 2>/dev/null
  NOTE[bench]="$(grep -c '"case"' "$bd/results.jsonl" 2>/dev/null) runs recorded; $(grep -c 'skipped, out of time' "$L/bench.log") cases left for a rerun"
  return $rc
}

phase env 30 do_env
phase deps 60 do_deps
phase configure 120 do_configure
phase build 300 do_build
phase test 240 do_test
phase bench 100000 do_bench
[ -f "$L/bench.md" ] && cat "$L/bench.md"
{
  echo
  echo "## gpu_check.sh summary ($(($(date +%s) - T0)) s of a ${BUDGET} s budget)"
  echo
  echo "| phase | status | seconds | note |"
  echo "|---|---|---|---|"
  for p in "${ORDER[@]}"; do
    echo "| $p | ${STATUS[$p]} | ${SECS[$p]} | ${NOTE[$p]:-} |"
  done
  if [ -s /tmp/ftune-parity.txt ]; then
    echo; echo "measured by the GPU tests:"; sed 's/^/    /' /tmp/ftune-parity.txt
  fi
} | tee "$L/summary.md"
for f in build.log ctest.log bench.log gpu_check.log; do  # what comes back is capped at 16 MiB
  [ -f "$L/$f" ] && [ "$(stat -c %s "$L/$f")" -gt 15000000 ] && tail -c 15000000 "$L/$f" >"$L/$f.t" && mv "$L/$f.t" "$L/$f"
done
[[ "${STATUS[test]:-ok}" == ok && "${STATUS[build]:-ok}" == ok ]]
