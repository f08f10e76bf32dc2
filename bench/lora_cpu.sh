#!/usr/bin/env bash
# LoRA / QLoRA training throughput and peak memory of `ftune train` against transformers + PEFT
# (+ bitsandbytes for QLoRA) (bench/peft_train.py), in one invocation on one machine: the same
# model dir (`ftune init-model --preset $PRESET`, SmolLM2-135M's shape by default), the same packed
# rows of data/sample_train.jsonl with the block-diagonal mask, seq 256, micro batch 2, threads,
# adapters (r 16, alpha 32, every linear, dropout 0), AdamW (fused), clipping 1.0, fp32 compute.
#   1. ftune LoRA vs PEFT LoRA (tokens/s, peak RSS);
#   2. ftune QLoRA (NF4 base, compute fp32) vs ftune LoRA: the cost of dequantizing;
#   3. ftune QLoRA vs PEFT + bitsandbytes NF4 (where bitsandbytes runs on this CPU; else noted).
# Each case runs ROUNDS times in alternating order; tokens/s is the median of steps 2..STEPS
# (step 1 is warm-up), best round; peak RSS is /usr/bin/time's maximum resident set size.
# Usage: bench/lora_cpu.sh   (repo root, after `make build`; env THREADS=2 ROUNDS=2 STEPS=12
#        PRESET=smollm2-135m SEQ=256 BATCH=2 FTUNE_BIN=build/bin/ftune)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-12}
PRESET=${PRESET:-smollm2-135m}
SEQ=${SEQ:-256}
BATCH=${BATCH:-2}
PY=${PYTHON:-.venv/bin/python}
FT=${FTUNE_BIN:-build/bin/ftune}
W=runs/bench_lora
DATA=data/sample_train.jsonl
MODEL=$W/models/$PRESET
export OMP_NUM_THREADS=$T
mkdir -p "$W/models" "$W/out"
RES=$W/out/results.jsonl
: >"$RES"

# record IMPL ROUND RSS_FILE JSON: appends JSON + impl/round/peak RSS to results.jsonl.
record() {
  $PY - "$1" "$2" "$3" "$4" >>"$RES" <<'PYEOF'
import json, sys
impl, rnd, rss_file, rec = sys.argv[1:5]
r = json.loads(rec)
r.update(impl=impl, round=int(rnd), peak_rss_bytes=int(open(rss_file).read().split()[-1]) * 1024)
print(json.dumps(r))
PYEOF
}

ftune_case() {  # IMPL ROUND --set ...: ftune train; per-step times from its metrics.jsonl; returns
               # 1 (noted) when it fails
  local i=$1 r=$2 out=$W/out/$1
  shift 2
  /usr/bin/time -f "%M" -o "$out.rss" $FT train --config bench/configs/lora_packed.yaml \
    --set model.path="$MODEL" --set training.output_dir="$out" --set training.threads="$T" \
    --set training.steps="$STEPS" --set data.seq_len="$SEQ" --set training.micro_batch="$BATCH" \
    "$@" >"$out.log" 2>&1 || { echo "  $i: did not run: $(tail -1 "$out.log")"; return 1; }
  record "$i" "$r" "$out.rss" "$($PY bench/ftune_steps.py "$out/metrics.jsonl")"
  grep -h "^parameters:" "$out.log" | tail -1 | sed "s/^/  $i: /"
}

peer_case() {  # IMPL ROUND ARGS...: bench/peft_train.py; returns 1 (noted) when it cannot run
  local i=$1 r=$2 out=$W/out/$1 json
  shift 2
  if ! /usr/bin/time -f "%M" -o "$out.rss" $PY bench/peft_train.py --model "$MODEL" --data "$DATA" \
      --threads "$T" --steps "$STEPS" --seq-len "$SEQ" --micro-batch "$BATCH" "$@" \
      >"$out.json" 2>"$out.log"; then
    echo "  $i: did not run: $(grep -v '^\s*$' "$out.log" | tail -1)"
    return 1
  fi
  json=$(tail -1 "$out.json")
  record "$i" "$r" "$out.rss" "$json"
}

echo "# $(date -u +%F) preset=$PRESET seq=$SEQ batch=$BATCH steps=$STEPS threads=$T" \
  "rounds=$ROUNDS nproc=$(nproc) torch=$($PY -c 'import torch;print(torch.__version__)')" \
  "peft=$($PY -c 'import peft;print(peft.__version__)')" \
  "bitsandbytes=$($PY -c 'import bitsandbytes;print(bitsandbytes.__version__)' 2>/dev/null || echo none)"
[ -f "$MODEL/model.safetensors" ] ||
  $FT init-model --preset "$PRESET" --out "$MODEL" --dtype fp32 >/dev/null

QUANT=(--set quant.type=nf4 --set quant.double_quant=true --set quant.blocksize=64
       --set quant.compute_dtype=fp32)
BNB=1 FTQ=1
run_one() {  # IMPL ROUND; the LoRA cases must run, the QLoRA ones are noted when they cannot
  case $1 in
    ftune_lora) ftune_case ftune_lora "$2" || exit 1 ;;
    ftune_qlora) ((FTQ)) && { ftune_case ftune_qlora "$2" "${QUANT[@]}" || FTQ=0; } ;;
    peft) peer_case peft "$2" || exit 1 ;;
    peft_bnb) ((BNB)) && { peer_case peft_bnb "$2" --qlora --compute-dtype fp32 || BNB=0; } ;;
  esac
  return 0
}
for r in $(seq 1 "$ROUNDS"); do  # alternating order, so drifting load hits every side
  echo "round $r/$ROUNDS (load $(cut -d' ' -f1 /proc/loadavg))"
  if ((r % 2)); then order="ftune_lora peft ftune_qlora peft_bnb"
  else order="peft_bnb ftune_qlora peft ftune_lora"; fi
  for i in $order; do run_one "$i" "$r"; done
done

$PY - "$RES" <<'PYEOF'
import json, statistics as st, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
tok, rss, loss = {}, {}, {}
for r in recs:
    steps = [n / d for n, d in zip(r["step_tokens"][1:], r["step_s"][1:])]
    i = r["impl"]
    tok[i] = max(tok.get(i, 0), st.median(steps))
    rss[i] = min(rss.get(i, 1 << 62), r["peak_rss_bytes"])
    loss[i] = r["final_loss"]
print("\n| impl | median step tok/s (best round) | peak RSS MB (lowest round) | final loss |")
print("|---|---|---|---|")
for i in ("ftune_lora", "peft", "ftune_qlora", "peft_bnb"):
    if i in tok:
        print(f"| {i} | {tok[i]:.1f} | {rss[i] / 1e6:.0f} | {loss[i]:.4f} |")
print()
def ratio(a, b, what):
    if a in tok and b in tok:
        print(f"{what}: tokens/s {tok[a] / tok[b]:.2f}x, peak RSS {rss[a] / rss[b]:.2f}x")
    else:
        print(f"{what}: not measured ({b if b not in tok else a} did not run)")
ratio("ftune_lora", "peft", "ftune LoRA / PEFT LoRA")
ratio("ftune_qlora", "ftune_lora", "ftune QLoRA / ftune LoRA")
ratio("ftune_qlora", "peft_bnb", "ftune QLoRA / PEFT + bitsandbytes QLoRA")
PYEOF
