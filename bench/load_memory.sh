#!/usr/bin/env bash
# Peak memory of loading one HF model dir in bf16: ftune's load_model (tests/model/model_tool
# load-memory) against transformers' from_pretrained(dtype=bfloat16, low_cpu_mem_usage=True)
# on the same dir, same torch, same machine, one after the other. Each side reports its peak RSS
# (VmHWM, reset just before the load) minus its RSS right before the load, and the weight bytes.
# Usage: bench/load_memory.sh MODEL_DIR   (e.g. ~/.cache/ftune/models/smollm2-135m-instruct)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$1"
"$root/build/bin/model_tool" load-memory --model "$dir" --dtype bf16 | "$root/.venv/bin/python" -c '
import json, sys
r = json.loads(sys.stdin.read())
print("ftune:        " + json.dumps({k: r[k] for k in ("rss_before", "peak", "weight_bytes", "seconds")}))'

"$root/.venv/bin/python" - "$dir" <<'PY'
import json, sys, time
import torch, transformers
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
before = status("VmRSS:")
t = time.time()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16,
                                                      low_cpu_mem_usage=True)
dt = time.time() - t
w = sum(p.numel() * p.element_size() for p in m.parameters())
print("transformers: " + json.dumps({"rss_before": before, "peak": status("VmHWM:"),
      "weight_bytes": w, "seconds": round(dt, 2)}))
PY
