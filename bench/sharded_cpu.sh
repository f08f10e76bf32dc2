#!/usr/bin/env bash
# ftune's data-parallel strategies side by side on CPU, with PyTorch FSDP2 as the peer: each row of
# STRATEGIES at NPROC processes of 1 thread each (torchrun, OMP_NUM_THREADS=1), full fine-tuning
# and LoRA (r 16, alpha 32, every linear, dropout 0), on the same model dir (`ftune init-model
# --preset $PRESET`), rows (packed data/sample_train.jsonl, seq SEQ, MICRO_BATCH rows per rank x
# GRAD_ACCUM), fused AdamW + cosine (lr 1e-4, weight decay 0.01 full / 0 LoRA on >= 2-dim
# params), clipping 1.0, fp32.
# Rows: ddp, zero1, zero2, fsdp, fsdp+offload (parallel.strategy=fsdp, parallel.offload=optimizer)
# are `ftune train`; torch_fsdp2 and torch_fsdp2+offload are bench/torch_fsdp.py (fully_shard per
# decoder layer then the root, Gloo; CPUOffloadPolicy for +offload). The ftune runs dump their
# micro-batches (training.dump_batches) and the PyTorch rows train on exactly those rows (and for
# LoRA from ftune's initial adapter), so the per-step losses are comparable (printed). An ftune
# row whose strategy this build lacks ("not built yet", an unknown value) is skipped and noted.
# Reported per row: global tokens/s (median of steps MEDIAN_FROM..STEPS), exposed communication
# fraction (ftune's comm_exposed_s; not measured for FSDP2), rank 0's held MB by role from
# metrics.jsonl (ftune), each rank's peak RSS (/usr/bin/time around every worker), final loss.
# Usage: bench/sharded_cpu.sh   (repo root, after `make build`; env NPROC=2 STEPS=10
#        MEDIAN_FROM=3 PRESET=smollm2-135m SEQ=256 MICRO_BATCH=1 GRAD_ACCUM=1 MODES="full lora"
#        STRATEGIES="ddp zero1 zero2 fsdp fsdp+offload torch_fsdp2 torch_fsdp2+offload"
#        RUN_TIMEOUT=1200 FTUNE_BIN=build/bin/ftune)
# Quick check that it works: PRESET=tiny STEPS=3 MEDIAN_FROM=2 SEQ=64 bench/sharded_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
STEPS=${STEPS:-10}
MEDIAN_FROM=${MEDIAN_FROM:-3}
PRESET=${PRESET:-smollm2-135m}
SEQ=${SEQ:-256}
MB=${MICRO_BATCH:-1}
GA=${GRAD_ACCUM:-1}
MODES=${MODES:-full lora}
STRATEGIES=${STRATEGIES:-ddp zero1 zero2 fsdp fsdp+offload torch_fsdp2 torch_fsdp2+offload}
RUN_TIMEOUT=${RUN_TIMEOUT:-1200}
PY=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
FT=${FTUNE_BIN:-build/bin/ftune}
W=runs/bench_sharded
MODEL=$W/models/$PRESET
export OMP_NUM_THREADS=1
rm -rf "$W/out"
mkdir -p "$W/models" "$W/out"
RES=$W/results.jsonl
: >"$RES"
[ -f "$MODEL/model.safetensors" ] ||
  "$FT" init-model --preset "$PRESET" --out "$MODEL" --dtype fp32 >/dev/null
echo "# $(date -u +%F) preset=$PRESET nproc=$NPROC threads/rank=1 seq=$SEQ micro_batch/rank=$MB" \
  "grad_accum=$GA steps=$STEPS median_from=$MEDIAN_FROM cores=$(getconf _NPROCESSORS_ONLN)" \
  "torch=$($PY -c 'import torch;print(torch.__version__)')"

# shellcheck source=bench/torchrun_n.sh
source bench/torchrun_n.sh  # torchrun_n RSS_PREFIX CMD...

record() {  # ROW MODE RSS_PREFIX JSON [METRICS_JSONL]: appends one result line
  $PY - "$@" <<'PYEOF' >>"$RES"
import glob, json, sys
row, mode, prefix, rec = sys.argv[1:5]
r = json.loads(rec)
ranks = sorted(glob.glob(prefix + ".[0-9]*"), key=lambda f: int(f.rsplit(".", 1)[1]))
r["rank_peak_rss_bytes"] = [int(open(f).read().split()[-1]) * 1024 for f in ranks]
if len(sys.argv) > 5:  # ftune: rank 0's held bytes by role, last logged step
    last = [json.loads(l) for l in open(sys.argv[5])][-1]
    r.update({k: last[k] for k in last if k.startswith("held_")})
r.update(row=row, mode=mode)
print(json.dumps(r))
PYEOF
}

SKIPPED=()
ftune_row() {  # MODE STRATEGY
  local mode=$1 row=$2 out=$W/out/$1-$2 cfg=bench/configs/train_packed.yaml
  [ "$mode" = lora ] && cfg=bench/configs/lora_packed.yaml
  local sets=(--set "model.path=$MODEL" --set "data.seq_len=$SEQ" --set "training.micro_batch=$MB"
    --set "training.grad_accum=$GA" --set "training.steps=$STEPS" --set "training.threads=1"
    --set "training.lr=1e-4" --set "training.max_grad_norm=1.0" --set "training.output_dir=$out"
    --set "training.dump_batches=true" --set "logging.peak_flops=1e10"
    --set "parallel.strategy=${row%+offload}")
  [ "$row" != "${row%+offload}" ] && sets+=(--set "parallel.offload=optimizer")
  if ! torchrun_n "$out.rss" "$FT" train --config "$cfg" "${sets[@]}" >"$out.log" 2>&1; then
    local why
    why=$(grep -m1 "error:" "$out.log" || grep -v '^\s*$' "$out.log" | tail -1)
    if grep -q "not built yet\|parallel.strategy: expected\|parallel.offload: \|unknown key" "$out.log"; then
      SKIPPED+=("$mode $row: $why")
      echo "  $mode $row skipped: $why"
      return 0
    fi
    echo "  $mode $row failed (log $out.log): $why"
    exit 1
  fi
  record "$row" "$mode" "$out.rss" "$($PY bench/ftune_steps.py "$out/metrics.jsonl")" \
    "$out/metrics.jsonl"
  [ -d "$W/out/$mode-batches" ] || cp -r "$out/batches" "$W/out/$mode-batches"
}

torch_row() {  # MODE ROW: PyTorch FSDP2, on ftune's dumped rows when there are some
  local mode=$1 row=$2 out=$W/out/$1-$2 b=$W/out/$1-batches args=()
  [ "$mode" = lora ] && args+=(--lora --lora-r 16 --lora-alpha 32 --weight-decay 0)
  [ "$mode" = full ] && args+=(--weight-decay 0.01)
  [ "$row" != "${row%+offload}" ] && args+=(--offload)
  if [ -f "$b/rank$((NPROC - 1))/step-$STEPS.safetensors" ]; then
    args+=(--batches "$b")
    for a in "$b/initial_adapter" "$b/rank0/initial_adapter"; do
      [ "$mode" = lora ] && [ -f "$a/adapter_config.json" ] && { args+=(--adapter "$a"); break; }
    done
  fi
  if ! torchrun_n "$out.rss" "$PY" bench/torch_fsdp.py --model "$MODEL" \
      --data data/sample_train.jsonl --threads 1 --steps "$STEPS" --seq-len "$SEQ" \
      --micro-batch "$MB" --grad-accum "$GA" --lr 1e-4 --clip 1.0 "${args[@]}" \
      >"$out.json" 2>"$out.log"; then
    echo "  $mode $row failed (log $out.log): $(grep -v '^\s*$' "$out.log" | tail -1)"
    exit 1
  fi
  record "$row" "$mode" "$out.rss" "$(grep '^{' "$out.json" | tail -1)"
}

for mode in $MODES; do
  for row in $STRATEGIES; do
    echo "$mode $row (load $(cut -d' ' -f1 /proc/loadavg))"
    case $row in
      torch_*) torch_row "$mode" "$row" ;;
      *) ftune_row "$mode" "$row" ;;
    esac
  done
done

$PY - "$RES" "$MEDIAN_FROM" "$NPROC" "$MB" "$GA" "$SEQ" "${SKIPPED[@]}" <<'PYEOF'
import json, statistics as st, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
first = int(sys.argv[2]) - 1
nproc, mb, ga, seq = map(int, sys.argv[3:7])
tokens = nproc * mb * ga * seq  # global tokens per step (ftune logs rank-local tokens)
print("\n| mode | row | global tok/s | exposed comm | held MB: params / grads (peak) / optimizer /"
      " buffers (rank 0) | peak RSS MB per rank | final loss |")
print("|---|---|---|---|---|---|---|")
ref = {}
for r in recs:
    tok = st.median(tokens / s for s in r["step_s"][first:])
    ex = r.get("step_comm_exposed_s")
    ex = f"{100 * sum(ex[first:]) / sum(r['step_s'][first:]):.1f}%" if ex else "not measured"
    held = " / ".join(f"{r[k] / 1e6:.0f}" if k in r else "-" for k in
                      ("held_param_bytes", "held_grad_bytes", "held_optimizer_bytes",
                       "held_buffer_bytes"))
    rss = " / ".join(f"{b / 1e6:.0f}" for b in r["rank_peak_rss_bytes"])
    print(f"| {r['mode']} | {r['row']} | {tok:.1f} | {ex} | {held} | {rss} | "
          f"{r['final_loss']:.4f} |")
    ref.setdefault(r["mode"], r)
print()
for r in recs:  # equal work: every row's per-step losses against the mode's first row
    a = ref[r["mode"]]
    if r is not a and r.get("rows", "ftune_dump") == "ftune_dump":
        d = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(r["losses"], a["losses"]))
        print(f"{r['mode']} {r['row']}: per-step losses vs {a['row']}, worst relative difference"
              f" {d:.1e}")
for why in sys.argv[7:]:
    print(f"skipped: {why}")
PYEOF
