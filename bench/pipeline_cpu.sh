#!/usr/bin/env bash
# Pipeline parallelism on CPU: `ftune train` with parallel.strategy=pipeline, parallel.pp=NPROC
# against PyTorch's torch.distributed.pipelining (bench/torch_pipeline.py: PipelineStage +
# ScheduleGPipe / Schedule1F1B, Gloo) for every SCHEDULES x MICRO_BATCHES (naive gpipe 1f1b x
# 1 4 8), NPROC processes of 1 thread each (training.threads=1 / torch.set_num_threads(1),
# OMP_NUM_THREADS=1), fp32, full fine-tuning. Equal work: the same model dir (`ftune init-model`:
# SHAPE below, or PRESET=<ftune preset>), layers split evenly at a layer boundary, a step of M
# micro-batches (training.grad_accum = parallel.micro_batches = M) of MICRO_BATCH rows of SEQ
# tokens, fused AdamW + cosine (lr 1e-4, weight decay 0.01 on >= 2-dim params), no clipping on
# either side (torch's clipping would be per stage). Rows differ in content: ftune's are packed
# data/sample_text.jsonl (format text: every token a target), the peer's random ids (full rows,
# every token a target); ftune's packed rows hold several documents and attend through a dense
# block mask, more work than the peer's is_causal rows. "naive" is ftune's
# parallel.schedule=naive and, for the peer, ScheduleGPipe run M times
# with one micro-batch each (plain gradient accumulation through the pipeline).
# The default SHAPE (8 layers, hidden 384, vocab 259: ~12.6M parameters) keeps stages balanced
# (tiny lm_head) and one 10-step run under a minute on 2 cores; PRESET=smollm2-135m is ~20x slower.
# Reported per row: global tokens/s (median of steps MEDIAN_FROM..STEPS; the peer runs
# MEDIAN_FROM-1 untimed warm-up steps, then the rest), each stage's peak memory (ftune: metrics'
# stage_peak_mem_bytes; PyTorch: each rank's peak RSS from /usr/bin/time), ftune's measured bubble
# (metrics' pipeline_bubble, median over the same steps), the peer's share of step time spent
# waiting (its schedule's P2P waits = bubble + transfers, and the step's blocking all-reduces;
# averaged over stages), the theoretical bubble
# ((P-1)/(M+P-1); naive (P-1)/P). Schedule1F1B refuses M < P in torch: that peer row says so.
# Afterwards scripts/plot_pipeline_timeline.py draws the 1f1b M=4 ftune run's last logged step
# (pipeline_timeline.png in its run dir).
# Launch: both sides under `torchrun --standalone --no-python`, each worker under /usr/bin/time
# (as bench/sharded_cpu.sh); LAUNCHER=ftune runs ftune as `ftune launch --nproc NPROC -- train`.
# An ftune without the pipeline strategy ("parallel.strategy: expected ...", an unknown key) is
# noted and the peer rows still run.
# Usage: bench/pipeline_cpu.sh   (repo root, after `make build`; env NPROC=2 STEPS=10
#        MEDIAN_FROM=3 SEQ=256 MICRO_BATCH=1 SCHEDULES="naive gpipe 1f1b" MICRO_BATCHES="1 4 8"
#        PRESET= (empty: SHAPE) LAUNCHER=torchrun|ftune RUN_TIMEOUT=600 FTUNE_BIN=build/bin/ftune)
# Quick check that it works: STEPS=3 MEDIAN_FROM=2 SEQ=64 MICRO_BATCHES="1 4" bench/pipeline_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
STEPS=${STEPS:-10}
MEDIAN_FROM=${MEDIAN_FROM:-3}
SEQ=${SEQ:-256}
MB=${MICRO_BATCH:-1}
SCHEDULES=${SCHEDULES:-naive gpipe 1f1b}
MICRO_BATCHES=${MICRO_BATCHES:-1 4 8}
PRESET=${PRESET:-}
LAUNCHER=${LAUNCHER:-torchrun}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
PY=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
FT=${FTUNE_BIN:-build/bin/ftune}
W=runs/bench_pipeline
export OMP_NUM_THREADS=1
case $LAUNCHER in
  torchrun | ftune) ;;
  *) echo "LAUNCHER: expected torchrun or ftune, got $LAUNCHER" >&2; exit 1 ;;
esac
if ((MEDIAN_FROM < 1 || MEDIAN_FROM > STEPS)); then
  echo "MEDIAN_FROM: expected 1..STEPS ($STEPS), got $MEDIAN_FROM" >&2
  exit 1
fi
rm -rf "$W/out"
mkdir -p "$W/models" "$W/out"
RES=$W/results.jsonl
: >"$RES"

if [ -n "$PRESET" ]; then
  NAME=$PRESET
  MODEL=$W/models/$NAME
  [ -f "$MODEL/model.safetensors" ] ||
    "$FT" init-model --preset "$PRESET" --out "$MODEL" --dtype fp32 >/dev/null
else
  NAME=llama-8l-384
  MODEL=$W/models/$NAME
  if [ ! -f "$MODEL/model.safetensors" ]; then
    cat >"$W/models/$NAME.json" <<'EOF'
{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 259,
 "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8,
 "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 2048,
 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "float32"}
EOF
    "$FT" init-model --config "$W/models/$NAME.json" --out "$MODEL" --dtype fp32 >/dev/null
  fi
fi
echo "# $(date -u +%F) model=$NAME pp=$NPROC threads/rank=1 seq=$SEQ micro_batch=$MB" \
  "steps=$STEPS median_from=$MEDIAN_FROM launcher=$LAUNCHER cores=$(getconf _NPROCESSORS_ONLN)" \
  "torch=$($PY -c 'import torch;print(torch.__version__)')" \
  "transformers=$($PY -c 'import transformers;print(transformers.__version__)')"

# shellcheck source=bench/torchrun_n.sh
source bench/torchrun_n.sh  # torchrun_n RSS_PREFIX CMD...

# record SIDE SCHEDULE M RSS_PREFIX JSON|- [METRICS_JSONL]: appends one result line: tok_s (global,
# median of the measured steps), stage_mem_bytes, and ftune's bubble or the peer's wait share.
record() {
  $PY - "$@" "$NPROC" "$MB" "$SEQ" "$MEDIAN_FROM" >>"$RES" <<'PYEOF'
import glob, json, statistics as st, sys
side, sched, m, prefix, rec, metrics = sys.argv[1:7]
nproc, mb, seq, first = map(int, sys.argv[7:11])
m = int(m)
tokens = m * mb * seq  # global tokens per step: every row passes through every stage once
kib = lambda f: int(open(f).read().split()[-1]) * 1024
ranks = sorted(glob.glob(prefix + ".[0-9]*"), key=lambda f: int(f.rsplit(".", 1)[1]))
r = {"side": side, "schedule": sched, "M": m, "rank_peak_rss_bytes": [kib(f) for f in ranks]}
if side == "ftune":
    rows = [json.loads(l) for l in open(metrics)]
    rows = [x for x in rows if "tokens_per_s" in x]  # step lines (log_every 1)
    if "tokens" in rows[0]:  # cumulative tokens as counted by ftune: seconds per step from them
        prev, step_s = 0, []
        for x in rows:
            step_s.append((x["tokens"] - prev) / x["tokens_per_s"])
            prev = x["tokens"]
        tok = [tokens / s for s in step_s[first - 1:]]
    else:
        tok = [x["tokens_per_s"] for x in rows[first - 1:]]
    last = rows[-1]
    r.update(tok_s=st.median(tok), final_loss=last.get("loss"),
             stage_mem_bytes=last.get("stage_peak_mem_bytes") or r["rank_peak_rss_bytes"],
             stage_mem_from="stage_peak_mem_bytes" if "stage_peak_mem_bytes" in last
             else "rank peak RSS",
             bubble=st.median(x["pipeline_bubble"] for x in rows[first - 1:])
             if "pipeline_bubble" in last else None,
             bubble_theory=last.get("pipeline_bubble_theory"),
             stage_busy_s=last.get("stage_busy_s"))
else:
    p = json.loads(rec)
    if "unsupported" in p:
        r["unsupported"] = p["unsupported"]
    else:
        r.update(tok_s=st.median(tokens / s for s in p["step_s"]), final_loss=p["final_loss"],
                 stage_mem_bytes=r["rank_peak_rss_bytes"] or p["stage_peak_rss_bytes"],
                 wait_share=sum(p["stage_wait_share"]) / len(p["stage_wait_share"]),
                 bubble_theory=p["theoretical_bubble"])
print(json.dumps(r))
PYEOF
}

FT_OK=1 FT_WHY="" PLOT_RUN=""
ftune_row() {  # SCHEDULE M
  local s=$1 m=$2 out=$W/out/ftune-$1-$2
  # Plain text: every token is a target, as on the peer's side.
  local args=(train --config bench/configs/train_packed.yaml --set "model.path=$MODEL"
    --set "data.train=data/sample_text.jsonl" --set "data.format=text"
    --set "data.seq_len=$SEQ" --set "training.micro_batch=$MB" --set "training.grad_accum=$m"
    --set "training.steps=$STEPS" --set "training.threads=1" --set "training.lr=1e-4"
    --set "training.weight_decay=0.01" --set "training.max_grad_norm=0"
    --set "training.output_dir=$out" --set "logging.log_every=1" --set "logging.peak_flops=1e10"
    --set "parallel.strategy=pipeline" --set "parallel.pp=$NPROC" --set "parallel.schedule=$s"
    --set "parallel.micro_batches=$m")
  local ok=1
  if [ "$LAUNCHER" = ftune ]; then
    timeout -k 10 "$RUN_TIMEOUT" /usr/bin/time -f %M -o "$out.rss" \
      "$FT" launch --nproc "$NPROC" --master-port 0 -- "${args[@]}" >"$out.log" 2>&1 || ok=0
  else
    torchrun_n "$out.rss" "$FT" "${args[@]}" >"$out.log" 2>&1 || ok=0
  fi
  if ((!ok)); then
    local why
    why=$(grep -m1 "error:" "$out.log" || grep -v '^\s*$' "$out.log" | tail -1)
    # only "this build has no such thing": a pipeline ftune's own config errors must fail the bench
    if grep -q "not built yet\|parallel.strategy: expected\|unknown key" "$out.log"; then
      FT_OK=0 FT_WHY="this ftune has no pipeline strategy yet: $why"
      echo "  ftune side NOT measured: $FT_WHY"
      return 0
    fi
    echo "  ftune $s M=$m failed (log $out.log): $why"
    exit 1
  fi
  record ftune "$s" "$m" "$out.rss" - "$out/metrics.jsonl"
  [ "$s" = 1f1b ] && [ "$m" = 4 ] && PLOT_RUN=$out
  return 0
}

torch_row() {  # SCHEDULE M
  local s=$1 m=$2 out=$W/out/torch-$1-$2
  if ! torchrun_n "$out.rss" "$PY" bench/torch_pipeline.py --model "$MODEL" --schedule "$s" \
      --grad-accum "$m" --micro-batches "$m" --micro-batch "$MB" --seq-len "$SEQ" \
      --steps "$((STEPS - MEDIAN_FROM + 1))" --warmup "$((MEDIAN_FROM - 1))" --threads 1 \
      --lr 1e-4 --weight-decay 0.01 --clip inf >"$out.json" 2>"$out.log"; then
    echo "  torch $s M=$m failed (log $out.log): $(grep -v '^\s*$' "$out.log" | tail -1)"
    exit 1
  fi
  record torch "$s" "$m" "$out.rss" "$(grep '^{' "$out.json" | tail -1)" -
}

for s in $SCHEDULES; do
  for m in $MICRO_BATCHES; do
    echo "$s M=$m (load $(cut -d' ' -f1 /proc/loadavg))"
    ((FT_OK)) && ftune_row "$s" "$m"
    torch_row "$s" "$m"
  done
done

$PY - "$RES" "$NPROC" "$FT_WHY" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
p, why = int(sys.argv[2]), sys.argv[3]
rows = {}
for r in recs:
    rows.setdefault((r["schedule"], r["M"]), {})[r["side"]] = r
mb = lambda xs: " / ".join(f"{b / 1e6:.0f}" for b in xs) if xs else "-"
pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
print(f"\n| schedule | M | ftune tok/s | peer tok/s | ftune / peer | ftune peak MB per stage |"
      f" peer peak RSS MB per stage | ftune measured bubble | peer wait share |"
      f" theoretical bubble |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (s, m), d in rows.items():
    f, t = d.get("ftune"), d.get("torch")
    theory = (p - 1) / p if s == "naive" else (p - 1) / (m + p - 1)
    if f and f.get("bubble_theory") is not None:
        theory = f["bubble_theory"]
    ft = f"{f['tok_s']:.0f}" if f else "not run"
    if t and "unsupported" in t:
        pt = f"n/a ({t['unsupported']})"
    else:
        pt = f"{t['tok_s']:.0f}" if t else "not run"
    ratio = f"{f['tok_s'] / t['tok_s']:.2f}x" if f and t and "tok_s" in t else "-"
    fmem = mb(f["stage_mem_bytes"]) + ("" if f["stage_mem_from"] == "stage_peak_mem_bytes"
                                       else " (RSS)") if f else "-"
    print(f"| {s} | {m} | {ft} | {pt} | {ratio} | {fmem} |"
          f" {mb(t.get('stage_mem_bytes')) if t else '-'} | {pct(f and f['bubble'])} |"
          f" {pct(t and t.get('wait_share'))} | {pct(theory)} |")
print()
for (s, m), d in rows.items():
    f = d.get("ftune")
    if f and f.get("stage_busy_s"):
        busy = " / ".join(f"{b * 1e3:.0f}" for b in f["stage_busy_s"])
        print(f"ftune {s} M={m}: stage busy ms in the last logged step {busy},"
              f" final loss {f['final_loss']:.4f}")
if why:
    print(f"ftune side not measured: {why}")
PYEOF

if [ -n "$PLOT_RUN" ]; then
  $PY scripts/plot_pipeline_timeline.py "$PLOT_RUN"
elif ((FT_OK)); then
  echo "no ftune 1f1b M=4 run in this matrix: no timeline chart"
else
  echo "no ftune run: no timeline chart"
fi
