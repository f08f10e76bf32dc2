#!/usr/bin/env bash
# Data-parallel training on CPU: `ftune train` with parallel.strategy=ddp against PyTorch DDP
# (bench/torch_ddp.py: DistributedDataParallel, Gloo, transformers' LlamaForCausalLM, + PEFT for
# LoRA) at NPROC processes of 1 thread each (training.threads=1 / torch.set_num_threads(1),
# OMP_NUM_THREADS=1), full fine-tuning and LoRA (r 16, alpha 32, every linear, dropout 0), in one
# invocation: the same model dir (`ftune init-model --preset $PRESET`), the same global batch
# (MICRO_BATCH rows per rank x GRAD_ACCUM x NPROC, seq SEQ), fused AdamW + cosine (weight decay
# 0.01 full / 0 LoRA, on >= 2-dim params), clipping 1.0, fp32, 25 MB gradient buckets.
# Equal rows: ftune dumps each rank's micro-batches (training.dump_batches; ~70 KB a step, inside
# its timed step) and the PyTorch side trains on exactly those (and, for LoRA, from ftune's
# initial adapter), with ftune's attention: block-diagonal mask, or SDPA causal when every target
# lies in its row's first segment. The per-step losses of both sides are compared as a check of
# equal work. Without dumps (ftune side not run) the peer cuts its own packed rows (noted).
# Both sides run under `torchrun --standalone --no-python`, each worker under /usr/bin/time
# (peak RSS of every rank); LAUNCHER=ftune runs ftune through `ftune launch` instead, under one
# /usr/bin/time (the largest rank's peak RSS; rank 0's from metrics.jsonl).
# Reported per side: tokens/s = global tokens per step / step time, median of steps
# MEDIAN_FROM..STEPS (step 1 warms up, PyTorch rebuilds its buckets in step 2), best of ROUNDS
# rounds in alternating order; exposed communication fraction over the same steps = sum of the
# seconds rank 0 waited on communication / sum of step seconds (ftune: metrics.jsonl's
# comm_exposed_s; PyTorch: see bench/torch_ddp.py); peak RSS of each rank.
# Usage: bench/ddp_cpu.sh   (repo root, after `make build`; env NPROC=2 ROUNDS=2 STEPS=12
#        MEDIAN_FROM=3 PRESET=smollm2-135m SEQ=256 MICRO_BATCH=1 GRAD_ACCUM=1 MODES="full lora"
#        LAUNCHER=torchrun|ftune RUN_TIMEOUT=1200 FTUNE_BIN=build/bin/ftune)
# Quick check that it works: PRESET=tiny STEPS=4 ROUNDS=1 bench/ddp_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-12}
MEDIAN_FROM=${MEDIAN_FROM:-3}
PRESET=${PRESET:-smollm2-135m}
SEQ=${SEQ:-256}
MB=${MICRO_BATCH:-1}
GA=${GRAD_ACCUM:-1}
MODES=${MODES:-full lora}
LAUNCHER=${LAUNCHER:-torchrun}
RUN_TIMEOUT=${RUN_TIMEOUT:-1200}
PY=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
FT=${FTUNE_BIN:-build/bin/ftune}
W=runs/bench_ddp
MODEL=$W/models/$PRESET
export OMP_NUM_THREADS=1
rm -rf "$W/out"
mkdir -p "$W/models" "$W/out"
RES=$W/results.jsonl
: >"$RES"
case $LAUNCHER in
  torchrun | ftune) ;;
  *) echo "LAUNCHER: expected torchrun or ftune, got $LAUNCHER" >&2; exit 1 ;;
esac

# shellcheck source=bench/torchrun_n.sh
source bench/torchrun_n.sh  # torchrun_n RSS_PREFIX CMD...

# record IMPL MODE ROUND RSS_PREFIX JSON: appends JSON + impl/mode/round/per-rank peak RSS.
record() {
  $PY - "$@" "$NPROC" "$((NPROC * MB * GA * SEQ))" >>"$RES" <<'PYEOF'
import glob, json, sys
impl, mode, rnd, prefix, rec, nproc, tokens = sys.argv[1:8]
r = json.loads(rec)
kib = lambda f: int(open(f).read().split()[-1]) * 1024
ranks = sorted(glob.glob(prefix + ".[0-9]*"), key=lambda f: int(f.rsplit(".", 1)[1]))
if ranks:
    r["rank_peak_rss_bytes"] = [kib(f) for f in ranks]
else:  # `ftune launch` under one /usr/bin/time: the largest rank (wait4 keeps the children's max)
    r["rank_peak_rss_bytes"] = [r.get("peak_mem_bytes_rank0", 0)] + [None] * (int(nproc) - 1)
    r["max_rank_peak_rss_bytes"] = kib(prefix)
r.update(impl=impl, mode=mode, round=int(rnd), global_step_tokens=int(tokens))
print(json.dumps(r))
PYEOF
}

FT_OK=1 FT_WHY=""
ftune_case() {  # MODE ROUND: ftune DDP; notes and skips the ftune side when DDP is not there
  local mode=$1 r=$2 out=$W/out/ftune_$1 cfg=bench/configs/train_packed.yaml
  [ "$mode" = lora ] && cfg=bench/configs/lora_packed.yaml
  local args=(train --config "$cfg" --set model.path="$MODEL" --set training.output_dir="$out"
    --set training.threads=1 --set training.steps="$STEPS" --set data.seq_len="$SEQ"
    --set training.micro_batch="$MB" --set training.grad_accum="$GA" --set training.lr=1e-4
    --set training.max_grad_norm=1.0 --set training.dump_batches=true
    --set logging.peak_flops=1e10 --set parallel.strategy=ddp --set parallel.bucket_mb=25)
  rm -f "$out".rss*
  local ok=1
  if [ "$LAUNCHER" = ftune ]; then
    timeout -k 10 "$RUN_TIMEOUT" /usr/bin/time -f %M -o "$out.rss" \
      $FT launch --nproc "$NPROC" --master-port 0 -- "${args[@]}" >"$out.log" 2>&1 || ok=0
  else
    torchrun_n "$out.rss" $FT "${args[@]}" >"$out.log" 2>&1 || ok=0
  fi
  if ((!ok)); then
    local why
    why=$(grep -m1 "ftune: error:" "$out.log" || grep -v '^\s*$' "$out.log" | tail -1)
    local unknown="parallel: section not supported\|parallel.strategy: \|launch: unknown"
    if grep -q "ftune: error:.*\($unknown\)" "$out.log"; then
      FT_OK=0 FT_WHY="this ftune has no DDP yet (parallel.strategy=ddp / ftune launch): $why"
      echo "  ftune side NOT measured: $FT_WHY"
      return 0
    fi
    echo "  ftune_$mode failed (log $out.log): $why"
    exit 1
  fi
  record "ftune_$mode" "$mode" "$r" "$out.rss" "$($PY bench/ftune_steps.py "$out/metrics.jsonl")"
}

torch_case() {  # MODE ROUND: PyTorch DDP, on ftune's dumped rows when there are some
  local mode=$1 r=$2 out=$W/out/torch_$1 b=$W/out/ftune_$1/batches args=()
  [ "$mode" = lora ] && args+=(--lora --lora-r 16 --lora-alpha 32 --weight-decay 0)
  [ "$mode" = full ] && args+=(--weight-decay 0.01)
  if [ -f "$b/rank$((NPROC - 1))/step-$STEPS.safetensors" ]; then
    args+=(--batches "$b")
    if [ "$mode" = lora ]; then
      for a in "$b/initial_adapter" "$b/rank0/initial_adapter"; do
        [ -f "$a/adapter_config.json" ] && { args+=(--adapter "$a"); break; }
      done
    fi
  fi
  rm -f "$out".rss*
  if ! torchrun_n "$out.rss" $PY bench/torch_ddp.py --model "$MODEL" \
      --data data/sample_train.jsonl --threads 1 --steps "$STEPS" --seq-len "$SEQ" \
      --micro-batch "$MB" --grad-accum "$GA" --lr 1e-4 --clip 1.0 --bucket-mb 25 "${args[@]}" \
      >"$out.json" 2>"$out.log"; then
    echo "  torch_$mode failed (log $out.log): $(grep -v '^\s*$' "$out.log" | tail -1)"
    exit 1
  fi
  record "torch_$mode" "$mode" "$r" "$out.rss" "$(grep '^{' "$out.json" | tail -1)"
}

echo "# $(date -u +%F) preset=$PRESET nproc=$NPROC threads/rank=1 seq=$SEQ micro_batch/rank=$MB" \
  "grad_accum=$GA global_batch=$((NPROC * MB * GA)) steps=$STEPS median_from=$MEDIAN_FROM" \
  "rounds=$ROUNDS launcher=$LAUNCHER cores=$(getconf _NPROCESSORS_ONLN)" \
  "torch=$($PY -c 'import torch;print(torch.__version__)')" \
  "transformers=$($PY -c 'import transformers;print(transformers.__version__)')" \
  "peft=$($PY -c 'import peft;print(peft.__version__)')"
[ -f "$MODEL/model.safetensors" ] ||
  $FT init-model --preset "$PRESET" --out "$MODEL" --dtype fp32 >/dev/null
for r in $(seq 1 "$ROUNDS"); do  # alternating order, so drifting load hits both sides
  for mode in $MODES; do
    echo "round $r/$ROUNDS, $mode (load $(cut -d' ' -f1 /proc/loadavg))"
    if ((r % 2)); then
      ((FT_OK)) && ftune_case "$mode" "$r"
      torch_case "$mode" "$r"
    else
      torch_case "$mode" "$r"
      ((FT_OK)) && ftune_case "$mode" "$r"
    fi
  done
done

$PY - "$RES" "$MEDIAN_FROM" "$FT_WHY" <<'PYEOF'
import json, statistics as st, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
first, why = int(sys.argv[2]) - 1, sys.argv[3]
best = {}  # (mode, side) -> the record of its best round by median tok/s
for r in recs:
    tok = [r["global_step_tokens"] / s for s in r["step_s"][first:]]
    r["tok_s"] = st.median(tok)
    ex = r.get("step_comm_exposed_s")
    r["exposed"] = sum(ex[first:]) / sum(r["step_s"][first:]) if ex else None
    k = (r["mode"], r["impl"].split("_")[0])
    if k not in best or r["tok_s"] > best[k]["tok_s"]:
        best[k] = r
mb = lambda b: "-" if b is None else f"{b / 1e6:.0f}"
print("\n| mode | side | global tok/s (median, best round) | exposed comm / step time |"
      " peak RSS MB per rank | final loss | rows |")
print("|---|---|---|---|---|---|---|")
for (mode, side), r in sorted(best.items()):
    rss = " / ".join(mb(b) for b in r["rank_peak_rss_bytes"])
    if "max_rank_peak_rss_bytes" in r:
        rss += f" (max over ranks {mb(r['max_rank_peak_rss_bytes'])})"
    ex = "not logged" if r["exposed"] is None else f"{r['exposed'] * 100:.1f}%"
    rows = r.get("rows", "ftune's sharded stream")
    print(f"| {mode} | {side} | {r['tok_s']:.1f} | {ex} | {rss} | {r['final_loss']:.4f} | {rows} |")
print()
for mode in sorted({m for m, _ in best}):
    f, t = best.get((mode, "ftune")), best.get((mode, "torch"))
    if not f or not t:
        print(f"{mode}: ftune / PyTorch DDP not measured (a side did not run)")
        continue
    peak = lambda r: max(b for b in [*r["rank_peak_rss_bytes"], r.get("max_rank_peak_rss_bytes")]
                         if b)
    print(f"{mode}: ftune / PyTorch DDP tokens/s {f['tok_s'] / t['tok_s']:.2f}x (target >= 1.0),"
          f" peak RSS (largest rank) {peak(f) / peak(t):.2f}x")
    if t.get("rows") == "ftune_dump":  # same rows, same start: the losses must agree
        d = max(abs(a - b) / abs(b) for a, b in zip(f["losses"], t["losses"]))
        print(f"  equal work: per-step losses ftune vs PyTorch on ftune's rows, worst relative"
              f" difference {d:.1e}")
    logged = f["step_tokens"][first:]
    if logged and logged[0] != f["global_step_tokens"]:
        print(f"  note: ftune's metrics.jsonl logs {logged[0]} tokens a step (rank-local?); the"
              f" global batch is {f['global_step_tokens']} tokens")
if why:
    print(f"ftune side not measured: {why}")
PYEOF
