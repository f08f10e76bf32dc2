#!/usr/bin/env bash
# One AdamW step on CPU fp32 parameters (issue 9 item 3, the optimizer step under
# parallel.offload: optimizer): ftune's optim::cpu_adamw_step (AdamW cpu_kernel) against
# torch.optim.AdamW(fused=True) and (foreach=True), plus ftune's at::_fused_adamw_ path (what
# fused=True runs, without Python). Same shapes (SmolLM2-135M's 272 tensors, 134.5M params, and
# one flat 10M tensor), random params and gradients, lr 1e-4, weight decay 0.01 on 2-D tensors,
# same thread counts (torch.set_num_threads / at::set_num_threads), in one invocation. Each
# implementation steps STEPS times after one warm-up step (which first-touches the state); the
# table shows the median step and the traffic it implies (28 bytes/param: p, g, m, v read; p, m,
# v written). ftune runs in build/bin/cpu_adam_bench, torch in the venv's python.
# Usage: bench/cpu_adam.sh   (repo root, after `make build`; env THREADS="1 2" STEPS=5
#        PYTHON=.venv/bin/python BIN=build/bin/cpu_adam_bench)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=${BIN:-build/bin/cpu_adam_bench}
STEPS=${STEPS:-5}
W=runs/bench_cpu_adam
mkdir -p "$W"
RES=$W/results.jsonl
: >"$RES"

torch_step() {  # layout numel threads impl(fused|foreach)
  $PY - "$($BIN --layout "$1" --numel "$2" --shapes 1)" "$1" "$3" "$4" "$STEPS" <<'PYEOF'
import json, statistics, sys, time
import torch
shapes, layout, impl = json.loads(sys.argv[1]), sys.argv[2], sys.argv[4]
threads, steps = int(sys.argv[3]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
ps = [torch.randn(s, requires_grad=True) for s in shapes]
for p in ps:
    p.grad = torch.randn(p.shape) * 1e-3
opt = torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.01},
                         {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}],
                        lr=1e-4, **{impl: True})
ms = []
for i in range(steps + 1):
    t0 = time.perf_counter()
    opt.step()
    if i:
        ms.append((time.perf_counter() - t0) * 1e3)
n = sum(p.numel() for p in ps)
med = statistics.median(ms)
print(json.dumps(dict(impl=f"torch AdamW({impl}=True)", layout=layout, numel=n, tensors=len(ps),
                      threads=threads, steps=steps, median_ms=round(med, 3),
                      gb_per_s=round(28 * n / (med * 1e6), 2))))
PYEOF
}

for case in "smollm2-135m 0" "flat 10000000"; do
  set -- $case
  for t in ${THREADS:-1 2}; do
    echo "cpu_adam: $1 threads=$t" >&2
    $BIN --layout "$1" --numel "$2" --threads "$t" --steps "$STEPS" | tee -a "$RES"
    for impl in fused foreach; do torch_step "$1" "$2" "$t" "$impl" | tee -a "$RES"; done
  done
done

$PY - "$RES" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{'layout':<14}{'params':>8}{'thr':>5}  {'implementation':<36}{'median ms':>10}"
      f"{'GB/s':>7}{'vs torch fused':>16}")
for r in rows:
    ref = next(x for x in rows if x["layout"] == r["layout"] and x["threads"] == r["threads"]
               and x["impl"] == "torch AdamW(fused=True)")
    speedup = ref["median_ms"] / r["median_ms"]
    print(f"{r['layout']:<14}{r['numel'] / 1e6:>7.1f}M{r['threads']:>5}  {r['impl']:<36}"
          f"{r['median_ms']:>10.1f}{r['gb_per_s']:>7.1f}{speedup:>15.2f}x")
PYEOF
