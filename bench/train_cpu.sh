#!/usr/bin/env bash
# Full fine-tuning throughput of `ftune train` vs the transformers Trainer (bench/hf_train.py) and a
# plain torch loop over transformers' LlamaForCausalLM (bench/torch_train.py): same model dirs
# (written once by `ftune init-model`), data, threads, torch, in one invocation.
#   1. equal shapes, packed fixed-length rows: tiny (seq 512, batch 4) and SmolLM2-135M (seq 256,
#      batch 2); tokens = batch * seq_len per step, first (warm-up) step excluded everywhere;
#   2. one epoch of data/sample_train.jsonl, tiny: ftune packing vs the Trainer padding each
#      micro-batch to its longest example; wall time of the training loop.
# The machine may be shared, so each case runs ROUNDS times in alternating order and the report
# uses per-step medians; MFU is against the best `ftune bench gemm` rate measured during the run.
#   3. equal work (issue 7 part 6), SmolLM2-135M shape, fp32, micro batch 2, seq 256, 2 threads:
#      ftune on the packed tiny recipe (bench/configs/train_packed.yaml) against the minimal
#      transformers loop (bench/peer_train.py: random ids, labels=ids, torch.optim.AdamW,
#      zero_grad(set_to_none=True)), each with clipping (max norm 1.0) + weight decay (0.01) off
#      and on; ftune also on the same text with every token a target (data.format text), the
#      peer's work per step. Median tok/s of steps MEDIAN_FROM..STEPS (5..15).
# Usage: bench/train_cpu.sh [--report]   (repo root, after `make build`; env THREADS=2 ROUNDS=2
#        FTUNE_BIN=build/bin/ftune; --report reprints the tables of the last run)
#        CASES=all (default) | smollm2_equal (only case 3; also PRESET=smollm2-135m STEPS=15
#        MEDIAN_FROM=5, e.g. `CASES=smollm2_equal PRESET=tiny STEPS=3 MEDIAN_FROM=2 ROUNDS=1` as a
#        quick check that the script works)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
PY=${PYTHON:-.venv/bin/python}
FT=${FTUNE_BIN:-build/bin/ftune}
W=runs/bench_train
DATA=data/sample_train.jsonl
export OMP_NUM_THREADS=$T
mkdir -p "$W/models" "$W/out"
RES=$W/out/results.jsonl
CASES=${CASES:-all}
PRESET=${PRESET:-smollm2-135m}
STEPS=${STEPS:-15}
MEDIAN_FROM=${MEDIAN_FROM:-5}
PEAK=${PEAK:-0}

gemm() { $FT bench gemm --threads "$T" | tee -a "$W/out/gemm.jsonl"; }

now() { date +%s.%N; }
load1() { cut -d' ' -f1 /proc/loadavg; }

# record CASE ROUND IMPL START JSON: appends JSON + case/round/process_s/load to results.jsonl.
record() {
  $PY - "$1" "$2" "$3" "$4" "$(now)" "$(load1)" "$5" >>"$RES" <<'PYEOF'
import json, sys
case, rnd, impl, t0, t1, load, rec = sys.argv[1:8]
r = json.loads(rec)
r.update(case=case, round=int(rnd), impl=impl, process_s=float(t1) - float(t0), load1=float(load))
print(json.dumps(r))
PYEOF
}

# ftune CASE ROUND CONFIG --set ...: runs ftune train, turns its metrics.jsonl into a record.
ftune() {  # env FT_IMPL names the ftune variant in the results (default "ftune")
  local c=$1 r=$2 cfg=$3 impl=${FT_IMPL:-ftune} t0
  local out=$W/out/${impl}_$1
  shift 3
  t0=$(now)
  $FT train --config "$cfg" --set training.output_dir="$out" --set training.threads="$T" \
    --set logging.peak_flops="$PEAK" "$@" >"$out.log" 2>&1 || { cat "$out.log"; exit 1; }
  record "$c" "$r" "$impl" "$t0" "$($PY bench/ftune_steps.py "$out/metrics.jsonl")"
}

peer() {  # CASE ROUND IMPL SCRIPT ARGS...
  local c=$1 r=$2 i=$3 s=$4 t0 out
  shift 4
  t0=$(now)
  out=$($PY "bench/$s" --threads "$T" --data "$DATA" "$@" 2>"$W/out/$c.$i.log" | tail -1) ||
    { cat "$W/out/$c.$i.log"; exit 1; }
  record "$c" "$r" "$i" "$t0" "$out"
}

TINY=$W/models/tiny
M135=$W/models/smollm2-135m
tiny_ft() { ftune tiny "$1" bench/configs/train_packed.yaml --set model.path=$TINY \
  --set data.seq_len=512 --set training.micro_batch=4 --set training.steps=30; }
tiny_hf() { peer tiny "$1" hf_trainer hf_train.py --mode packed --model $TINY --seq-len 512 \
  --micro-batch 4 --steps 30; }
tiny_pt() { peer tiny "$1" torch_loop torch_train.py --model $TINY --seq-len 512 --micro-batch 4 \
  --steps 30; }
tiny_pb() { peer tiny "$1" torch_loop_blockmask torch_train.py --model $TINY --seq-len 512 \
  --micro-batch 4 --steps 30 --block-mask; }
m135_ft() { ftune 135m "$1" bench/configs/train_packed.yaml --set model.path=$M135 \
  --set data.seq_len=256 --set training.micro_batch=2 --set training.steps=6; }
m135_hf() { peer 135m "$1" hf_trainer hf_train.py --mode packed --model $M135 --seq-len 256 \
  --micro-batch 2 --steps 6; }
m135_pt() { peer 135m "$1" torch_loop torch_train.py --model $M135 --seq-len 256 --micro-batch 2 \
  --steps 6; }
epoch_ft() { ftune epoch "$1" bench/configs/train_epoch.yaml --set model.path=$TINY; }
epoch_hf() { peer epoch "$1" hf_trainer hf_train.py --mode padded --model $TINY --seq-len 512 \
  --micro-batch 4 --epochs 1; }

# Case 3, equal work. eq_ft ROUND on|off recipe|text; eq_pt ROUND on|off.
EQM=$W/models/$PRESET
TEXT=$W/models/sample_text.jsonl  # data/sample_train.jsonl as plain text: every token a target
eq_ft() {
  local sets=(--set model.path="$EQM" --set data.seq_len=256 --set training.micro_batch=2
              --set training.steps="$STEPS")
  [ "$2" = off ] && sets+=(--set training.max_grad_norm=0 --set training.weight_decay=0)
  [ "$3" = text ] && sets+=(--set data.train="$TEXT" --set data.format=text)
  FT_IMPL=ftune_$3 ftune "eq_$2" "$1" bench/configs/train_packed.yaml "${sets[@]}"
}
eq_pt() {
  local c=eq_$2 t0 out args=()
  [ "$2" = on ] && args=(--clip 1.0 --weight-decay 0.01)
  t0=$(now)
  out=$($PY bench/peer_train.py --threads "$T" --model "$EQM" --seq-len 256 --micro-batch 2 \
    --steps "$STEPS" "${args[@]}" 2>"$W/out/$c.peer.log" | tail -1) || { cat "$W/out/$c.peer.log"; exit 1; }
  record "$c" "$1" transformers_loop "$t0" "$out"
}
run_equal() {
  [ -f "$EQM/model.safetensors" ] ||
    $FT init-model --preset "$PRESET" --out "$EQM" --dtype fp32 >/dev/null
  $PY - "$DATA" "$TEXT" <<'PYEOF'
import json, sys
with open(sys.argv[2], "w") as out:
    for line in open(sys.argv[1]):
        if line.strip():
            e = json.loads(line)
            text = "\n".join(x for x in (e["instruction"], e.get("input") or "", e["output"]) if x)
            out.write(json.dumps({"text": text}) + "\n")
PYEOF
  local r s
  for r in $(seq 1 "$ROUNDS"); do
    echo "equal work, round $r/$ROUNDS (load $(load1))"
    for s in off on; do  # alternate the side that runs first
      if (((r + ${#s}) % 2)); then eq_ft "$r" $s recipe; eq_ft "$r" $s text; eq_pt "$r" $s
      else eq_pt "$r" $s; eq_ft "$r" $s text; eq_ft "$r" $s recipe; fi
    done
  done
}

run_all() {
  : >"$RES"
  : >"$W/out/gemm.jsonl"
  echo "# $(date -u +%F) threads=$T rounds=$ROUNDS nproc=$(nproc)" \
    "torch=$($PY -c 'import torch;print(torch.__version__)')" \
    "transformers=$($PY -c 'import transformers;print(transformers.__version__)')"
  for p in tiny smollm2-135m; do
    [ -f "$W/models/$p/model.safetensors" ] ||
      $FT init-model --preset "$p" --out "$W/models/$p" --dtype fp32 >/dev/null
  done
  gemm
  PEAK=$($PY -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["fp32_flops_per_s"])' \
    "$W/out/gemm.jsonl")
  local r order i
  for r in $(seq 1 "$ROUNDS"); do  # alternating order, so drifting load hits every side
    echo "round $r/$ROUNDS (load $(load1))"
    if ((r % 2)); then order="ft hf pt pb"; else order="pb pt hf ft"; fi
    for i in $order; do tiny_$i "$r"; done
    for i in ${order/pb/}; do m135_$i "$r"; done
    if ((r % 2)); then epoch_ft "$r"; epoch_hf "$r"; else epoch_hf "$r"; epoch_ft "$r"; fi
    gemm
  done
}
if [ "${1:-}" != --report ]; then  # --report: reprint the tables of the last run only
  case $CASES in
    all) run_all; run_equal ;;
    smollm2_equal) : >"$RES"; echo "# $(date -u +%F) threads=$T rounds=$ROUNDS preset=$PRESET" \
      "steps=$STEPS torch=$($PY -c 'import torch;print(torch.__version__)')"; run_equal ;;
    *) echo "CASES: expected all or smollm2_equal, got $CASES" >&2; exit 1 ;;
  esac
fi

# Equal work: median tok/s of steps MEDIAN_FROM..STEPS per run, best round.
$PY - "$RES" "$MEDIAN_FROM" <<'PYEOF'
import json, statistics as st, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"eq_' in l]
first = int(sys.argv[2]) - 1
if recs:
    med = {}
    for r in recs:
        tok = [n / d for n, d in zip(r["step_tokens"][first:], r["step_s"][first:])]
        k = (r["impl"], r["case"][3:])
        med[k] = max(med.get(k, 0), st.median(tok))
        if "step_targets" in r:
            med[k + ("targets",)] = st.median(r["step_targets"][first:]) / r["step_tokens"][0]
    print(f"\n| equal work: side | clip 1.0 + decay 0.01 | median tok/s, steps {first + 1}+ (best round) |"
          " vs transformers loop | clip + decay cost | targets / token |")
    print("|---|---|---|---|---|---|")
    for impl in ("ftune_recipe", "ftune_text", "transformers_loop"):
        for s in ("off", "on"):
            if (impl, s) not in med:
                continue
            v, peer = med[(impl, s)], med.get(("transformers_loop", s))
            cost = (1 - med[(impl, "on")] / med[(impl, "off")]) * 100 if s == "on" and (impl, "off") in med else None
            print(f"| {impl} | {s} | {v:.1f} | {v / peer:.2f}x |" if peer else f"| {impl} | {s} | {v:.1f} | |",
                  f"{cost:.1f}% |" if cost is not None else " |",
                  f"{med[(impl, s, 'targets')]:.2f} |" if (impl, s, "targets") in med else "1.00 |")
PYEOF
[ "$CASES" = all ] || exit 0

$PY - "$RES" "$W/out/gemm.jsonl" <<'PYEOF'
import json, statistics as st, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
peak = max(json.loads(l)["fp32_flops_per_s"] for l in open(sys.argv[2]))
print(f"\nfp32 GEMM rate, best of the run: {peak / 1e9:.1f} GFLOP/s (MFU denominator)")
fpt = {r["case"]: r["flops_per_token"] for r in recs if "flops_per_token" in r}

# Equal shapes, first (warm-up) step of each run dropped. Headline: the median step of each
# round, best round (a round that shared the CPUs with other work is slower as a whole); the
# fastest single step approximates the machine with no other load.
print("\n| shape | impl | rounds | median step tok/s (best round) | fastest step tok/s |"
      " ftune / impl (median) | ftune / impl (fastest) | MFU (median) |")
print("|---|---|---|---|---|---|---|---|")
for case in ("tiny", "135m"):
    by = {}
    for r in recs:
        if r["case"] == case:
            by.setdefault(r["impl"], []).append(
                [n / d for n, d in zip(r["step_tokens"][1:], r["step_s"][1:])])
    med = {i: max(st.median(run) for run in runs) for i, runs in by.items()}
    top = {i: max(max(run) for run in runs) for i, runs in by.items()}
    for i in by:
        print(f"| {case} | {i} | {len(by[i])} | {med[i]:.1f} | {top[i]:.1f} |"
              f" {med['ftune'] / med[i]:.2f}x | {top['ftune'] / top[i]:.2f}x |"
              f" {med[i] * fpt[case] / peak * 100:.1f}% |")

# Epoch: loop time = sum of all step times (first step included); steps x median step time is
# the same estimate with other processes' bursts filtered out.
print("\n| epoch (tiny) | round | steps | tokens incl. padding | loop s | steps x median step s |"
      " process s | load1 |")
print("|---|---|---|---|---|---|---|---|")
ep = [r for r in recs if r["case"] == "epoch"]
loop, robust, proc = {}, {}, {}
for r in ep:
    i = r["impl"]
    ls, rb = sum(r["step_s"]), len(r["step_s"]) * st.median(r["step_s"])
    loop[i] = min(loop.get(i, 1e9), ls)
    robust[i] = min(robust.get(i, 1e9), rb)
    proc[i] = min(proc.get(i, 1e9), r["process_s"])
    print(f"| {i} | {r['round']} | {len(r['step_s'])} | {sum(r['step_tokens'])} | {ls:.1f} | {rb:.1f} |"
          f" {r['process_s']:.1f} | {r['load1']} |")
f, h = "ftune", "hf_trainer"
print(f"\nepoch, Trainer time / ftune time (best round): loop {loop[h] / loop[f]:.2f}x,"
      f" steps x median {robust[h] / robust[f]:.2f}x, whole process {proc[h] / proc[f]:.2f}x")
print("load1 at the end of each run:", [r["load1"] for r in recs])
PYEOF
