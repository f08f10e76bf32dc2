#!/usr/bin/env bash
# Forward+backward tokens/s of ftune vs transformers (same torch, shapes, threads, random ids),
# on a ~20M-parameter shape and the SmolLM2-135M shape, plus the machine's GEMM rate for MFU.
# Usage: bench/forward_cpu.sh [threads]   (run from the repo root after `make build`)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-$(nproc)}
PY=.venv/bin/python
FT=${FTUNE_BIN:-build/bin/ftune}
export OMP_NUM_THREADS=$T
echo "# $(date -u +%F) threads=$T torch=$($PY -c 'import torch;print(torch.__version__)')"
$FT bench gemm --size 1024 --threads "$T"
run() {  # label, ftune args, python args
  local f p
  f=$($FT bench forward $2 --threads "$T")
  p=$($PY bench/hf_forward.py $3 --threads "$T")
  echo "$f"; echo "$p"
  $PY - "$1" "$f" "$p" <<'PYEOF'
import json, sys
f, p = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{sys.argv[1]}: ftune {f['tokens_per_s']:.0f} tok/s, transformers {p['tokens_per_s']:.0f} tok/s,"
      f" ratio {f['tokens_per_s'] / p['tokens_per_s']:.2f}x, ftune {f['flops_per_s'] / 1e9:.1f} GFLOP/s")
PYEOF
}
run "20M   b4 s256" "--config bench/configs/llama_20m.json --batch 4 --seq-len 256 --steps 5" \
    "--config bench/configs/llama_20m.json --batch 4 --seq-len 256 --steps 5"
run "135M  b1 s512" "--preset smollm2-135m --batch 1 --seq-len 512 --steps 3" \
    "--preset smollm2-135m --batch 1 --seq-len 512 --steps 3"
