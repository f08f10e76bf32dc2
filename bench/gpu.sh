#!/usr/bin/env bash
# The GPU benchmarks of issue 13: `ftune train` against its peers in one invocation on one GPU,
# the same model files (bench/gpu_model.py: random weights drawn on the GPU, bf16, or NF4 in
# bitsandbytes' layout), the same packed rows of data/sample_train.jsonl (alpaca format, loss on
# the responses, block-diagonal mask and per-document positions on both sides), the same steps,
# AdamW (fused), cosine schedule, clipping 1.0. Tokens/s is the median over the steps after the
# first WARM (warm-up, excluded); peak memory is the CUDA caching allocator's max allocated bytes
# over the whole process on both sides (ftune's peak_mem_bytes, torch.cuda.max_memory_allocated).
# Cases, run in this order (BENCH_CASES picks some; each sub-run has its own timeout):
#   gemm          bf16 8192^3 torch.matmul rate: the MFU denominator (logging.peak_flops)
#   lora_1b       LoRA r16 alpha 32 on all linears, TinyLlama-1.1B shape, bf16 base + autocast,
#   lora_1b_ckpt  seq 2048, micro batch 4: ftune vs transformers + PEFT (SDPA), gradient
#                 checkpointing off and on; PEFT also with plain causal rows (its usual packing)
#   full_1b       full fine-tuning, TinyLlama-1.1B shape, fp32 master + bf16 autocast, seq 2048,
#                 micro batch 4: ftune vs a torch loop over transformers; MFU = tok/s x FLOPs/token
#                 / the gemm rate (target >= 50%)
#   qlora_7b      QLoRA r16 all linears on an NF4 Llama-2-7B shape, compute bf16, seq 2048, micro
#                 batch 2, checkpointing on: ftune vs transformers + PEFT + bitsandbytes
#   qlora_70b     QLoRA on an NF4 Llama-2-70B shape (L70_LAYERS of 80 layers, default all) on one
#                 GPU, micro batch 1, checkpointing on: ftune only, with `ftune memory`'s prediction
# Every ftune run is also shown next to `ftune memory`'s prediction for its settings.
# Results: $W/results.jsonl (one record per run; a rerun skips the cases already recorded unless
# BENCH_FORCE=1) and the markdown table $W/table.md, printed last.
# Usage: bench/gpu.sh [--dry-run]   (repo root; env FTUNE_BIN (build-gpu/bin/ftune), PYTHON
#        (python3), BENCH_DIR (runs/gpu_bench), BENCH_CASES, BENCH_DEADLINE (epoch seconds after
#        which no case starts), STEPS (8), WARM (2), L70_LAYERS (80))
#   --dry-run: every case on the CPU with the tiny preset's shape (seq 128, 3 steps), the venv's
#   python and build/bin/ftune, into runs/gpu_bench_dry: checks the scripts, measures nothing.
set -uo pipefail  # not -e: a failed run is recorded as failed and the next one starts
cd "$(dirname "$0")/.." || exit 1
DRY=0
[ "${1:-}" = --dry-run ] && DRY=1
if ((DRY)); then
  PY=${PYTHON:-.venv/bin/python}
  FT=${FTUNE_BIN:-build/bin/ftune}
  W=${BENCH_DIR:-runs/gpu_bench_dry}
  DEV=cpu SEQ=128 STEPS=${STEPS:-3} WARM=${WARM:-1} TO=300
  P1B=tiny P7B=tiny P70B=tiny L70=2 MB_1B=2 MB_7B=2 MB_70B=1
else
  PY=${PYTHON:-python3}
  FT=${FTUNE_BIN:-build-gpu/bin/ftune}
  W=${BENCH_DIR:-runs/gpu_bench}
  DEV=cuda SEQ=2048 STEPS=${STEPS:-8} WARM=${WARM:-2} TO=240
  P1B=tinyllama-1.1b P7B=llama-2-7b P70B=llama-2-70b L70=${L70_LAYERS:-80} MB_1B=4 MB_7B=2 MB_70B=1
fi
CASES=${BENCH_CASES:-gemm lora_1b lora_1b_ckpt full_1b qlora_7b qlora_70b}
DEADLINE=${BENCH_DEADLINE:-0}
DATA=data/sample_train.jsonl
M=$W/models
RES=$W/results.jsonl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$M" "$W/out"
touch "$RES"
[ -x "$FT" ] || { echo "bench/gpu.sh: $FT not found: build ftune first" >&2; exit 1; }

log() { echo "[gpu.sh $(date +%T)] $*"; }
# A case is done once its last run is recorded (the "_done" marker); an interrupted case's
# records are dropped before it runs again.
done_case() {
  [ "${BENCH_FORCE:-0}" = 1 ] && return 1
  grep "\"case\": \"$1\"" "$RES" | grep -q '"impl": "_done"'
}
drop_case() { grep -v "\"case\": \"$1\"" "$RES" >"$RES.tmp"; mv "$RES.tmp" "$RES"; }
# Seconds each case takes on an H200 (a guess until measured: model writing and loading
# included); a case starts only when that much is left before BENCH_DEADLINE.
declare -A EST=([gemm]=15 [lora_1b]=75 [lora_1b_ckpt]=75 [full_1b]=60 [qlora_7b]=100
                [qlora_70b]=200)
out_of_time() { ((DEADLINE > 0 && $(date +%s) + ${EST[$1]:-60} > DEADLINE)); }

# record CASE IMPL JSON [KEY=VALUE...]: appends JSON + case/impl (+ numeric extras) to $RES.
record() {
  $PY - "$@" >>"$RES" <<'PYEOF'
import json, sys
case, impl, rec = sys.argv[1:4]
r = json.loads(rec) if rec.startswith("{") else {"error": rec}
r.update(case=case, impl=impl)
for kv in sys.argv[4:]:
    k, v = kv.split("=", 1)
    r[k] = float(v) if v else None
print(json.dumps(r))
PYEOF
}

# predicted CASE_ARGS...: `ftune memory --json` total bytes for these settings ("" on error).
predicted() {
  $FT memory --json "$@" 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["total"])' \
    2>/dev/null || echo ""
}

# ftune_run CASE IMPL CONFIG MODEL "MEMORY ARGS" --set ...: one `ftune train`, recorded.
ftune_run() {
  local case=$1 impl=$2 cfg=$3 model=$4 mem=$5 out=$W/out/$1.$2 pred rc
  shift 5
  pred=$(predicted --model "$model" $mem)
  rm -rf "$out"
  log "$case: $impl"
  timeout -k 10 "$TO" $FT train --config "$cfg" --set model.path="$model" \
    --set model.device="$DEV" --set model.dtype=bf16 --set data.seq_len="$SEQ" \
    --set training.steps="$STEPS" --set training.output_dir="$out" \
    --set training.threads="$(nproc)" --set logging.peak_flops="$PEAK" "$@" >"$out.log" 2>&1
  rc=$?
  if ((rc == 0)) && [ -s "$out/metrics.jsonl" ]; then
    record "$case" "$impl" "$($PY bench/ftune_steps.py "$out/metrics.jsonl")" "predicted_bytes=$pred"
  else
    log "$case: $impl failed (rc $rc): $(grep -v '^\s*$' "$out.log" | tail -1)"
    record "$case" "$impl" "rc $rc: $(grep -v '^\s*$' "$out.log" | tail -1 | tr -d '"\\')" \
      "predicted_bytes=$pred"
  fi
}

# peer_run CASE IMPL SCRIPT ARGS...: one peer script (prints one JSON line), recorded.
peer_run() {
  local case=$1 impl=$2 script=$3 out=$W/out/$1.$2 rc
  shift 3
  log "$case: $impl"
  timeout -k 10 "$TO" $PY "bench/$script" --data "$DATA" --device "$DEV" --seq-len "$SEQ" \
    --steps "$STEPS" --threads "$(nproc)" "$@" >"$out.json" 2>"$out.log"
  rc=$?
  if ((rc == 0)) && [ -s "$out.json" ]; then
    record "$case" "$impl" "$(tail -1 "$out.json")"
  else
    log "$case: $impl failed (rc $rc): $(grep -v '^\s*$' "$out.log" | tail -1)"
    record "$case" "$impl" "rc $rc: $(grep -v '^\s*$' "$out.log" | tail -1 | tr -d '"\\')"
  fi
}

# model PRESET FORMAT [LAYERS]: path of a random model dir (bench/gpu_model.py), written once.
model() {
  local preset=$1 fmt=$2 layers=${3:-0} dir
  dir=$M/$preset-$fmt$( ((layers)) && echo "-l$layers")
  if [ ! -f "$dir/config.json" ]; then
    [ -f "$M/tok/tokenizer.json" ] || $FT init-model --preset tiny --out "$M/tok" >/dev/null
    $FT memory --model "$preset" --json >"$M/$preset.memory.json"
    timeout -k 10 "$TO" $PY bench/gpu_model.py --config "$M/$preset.memory.json" --out "$dir" \
      --format "$fmt" --tokenizer "$M/tok" --layers "$layers" --device "$DEV" >"$dir.json" 2>"$dir.log" ||
      { log "gpu_model.py $preset $fmt failed: $(tail -1 "$dir.log")" >&2; rm -rf "$dir"; return 1; }
    log "wrote $dir: $(cat "$dir.json")" >&2
  fi
  echo "$dir"
}

LORA=(--set lora.r=16 --set lora.alpha=32 --set lora.dropout=0 --set lora.targets=all-linear)
QUANT=(--set quant.type=nf4 --set quant.double_quant=true --set quant.blocksize=64
       --set quant.compute_dtype=bf16)
PEAK=$(grep -h '"flops_per_s"' "$RES" 2>/dev/null | tail -1 |
       $PY -c 'import json,sys; print(json.loads(sys.stdin.read() or "{}").get("flops_per_s", 0))')

run_case() {
  local c=$1 d
  case $c in
    gemm)
      log "gemm: torch bf16 matmul"
      record gemm torch "$($PY - "$DEV" <<'PYEOF'
import json, sys, time, torch
dev = sys.argv[1]
n = 8192 if dev == "cuda" else 1024
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
for _ in range(3):
    a @ b
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
sync()
t0, iters = time.perf_counter(), 10
for _ in range(iters):
    a @ b
sync()
dt = time.perf_counter() - t0
print(json.dumps({"n": n, "flops_per_s": 2 * n ** 3 * iters / dt,
                  "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                  "torch": torch.__version__}))
PYEOF
)"
      PEAK=$(tail -1 "$RES" | $PY -c 'import json,sys; print(json.load(sys.stdin).get("flops_per_s", 0))') ;;
    lora_1b | lora_1b_ckpt)
      local ck=false pk=() mk=()
      [ "$c" = lora_1b_ckpt ] && { ck=true; pk=(--grad-ckpt); mk=(--grad-ckpt); }
      d=$(model "$P1B" bf16) || { record "$c" gpu_model "writing the model failed"; return 0; }
      ftune_run "$c" ftune bench/configs/lora_packed.yaml "$d" \
        "--lora-r 16 --lora-targets all-linear --micro-batch $MB_1B --seq-len $SEQ ${mk[*]}" \
        "${LORA[@]}" --set training.micro_batch="$MB_1B" --set model.grad_checkpointing=$ck
      peer_run "$c" peft peft_train.py --model "$d" --micro-batch "$MB_1B" --dtype bf16 "${pk[@]}"
      peer_run "$c" peft_causal peft_train.py --model "$d" --micro-batch "$MB_1B" --dtype bf16 \
        --mask causal "${pk[@]}" ;;
    full_1b)
      d=$(model "$P1B" bf16) || { record "$c" gpu_model "writing the model failed"; return 0; }
      ftune_run full_1b ftune bench/configs/train_packed.yaml "$d" \
        "--micro-batch $MB_1B --seq-len $SEQ" --set training.micro_batch="$MB_1B"
      peer_run full_1b torch_loop torch_train.py --model "$d" --micro-batch "$MB_1B" --bf16 \
        --fused --block-mask ;;
    qlora_7b)
      d=$(model "$P7B" nf4) || { record "$c" gpu_model "writing the model failed"; return 0; }
      ftune_run qlora_7b ftune bench/configs/lora_packed.yaml "$d" \
        "--qlora --lora-r 16 --lora-targets all-linear --micro-batch $MB_7B --seq-len $SEQ --grad-ckpt" \
        "${LORA[@]}" "${QUANT[@]}" --set training.micro_batch="$MB_7B" \
        --set model.grad_checkpointing=true
      peer_run qlora_7b peft_bnb peft_train.py --model "$d" --micro-batch "$MB_7B" --dtype bf16 \
        --qlora --compute-dtype bf16 --grad-ckpt ;;
    qlora_70b)
      d=$(model "$P70B" nf4 "$L70") || { record "$c" gpu_model "writing the model failed"; return 0; }
      STEPS=$((WARM + 2)) ftune_run qlora_70b ftune bench/configs/lora_packed.yaml "$d" \
        "--qlora --lora-r 16 --lora-targets all-linear --micro-batch $MB_70B --seq-len $SEQ --grad-ckpt" \
        "${LORA[@]}" "${QUANT[@]}" --set training.micro_batch="$MB_70B" \
        --set model.grad_checkpointing=true
      # the full 80-layer prediction next to a depth-cut run
      record qlora_70b memory_80_layers "{}" "predicted_bytes=$(predicted --model "$P70B" --qlora \
        --lora-r 16 --lora-targets all-linear --micro-batch "$MB_70B" --seq-len "$SEQ" --grad-ckpt)"
      ((DRY)) || rm -rf "$d" ;;  # 35 GB of a 64 GB disk
    *) echo "bench/gpu.sh: unknown case $c" >&2; return 1 ;;
  esac
}

log "$(nproc) CPUs; torch $($PY -c 'import torch;print(torch.__version__)'); ftune $FT; cases: $CASES"
for c in $CASES; do
  if done_case "$c"; then log "$c: already in $RES (BENCH_FORCE=1 reruns)"; continue; fi
  if out_of_time "$c"; then log "$c: skipped, out of time (a rerun runs it)"; continue; fi
  if [ "$c" != gemm ] && [ "${PEAK:-0}" = 0 ]; then drop_case gemm; run_case gemm; fi
  drop_case "$c"
  run_case "$c" && record "$c" _done "{}"
done

$PY bench/gpu_report.py "$RES" "$WARM" | tee "$W/table.md"
