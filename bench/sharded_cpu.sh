#!/usr/bin/env bash
# ftune's data-parallel strategies side by side on CPU: ddp, zero1 and zero2 at NPROC processes of
# 1 thread each (`ftune launch`), full fine-tuning and LoRA (r 16, alpha 32, every linear), on the
# same model dir (`ftune init-model --preset $PRESET`), rows (packed data/sample_train.jsonl, seq
# SEQ, MICRO_BATCH rows per rank), AdamW + cosine, clipping 1.0, fp32. Reported per case: global
# tokens/s (median of steps MEDIAN_FROM..STEPS), exposed communication fraction, rank 0's held
# bytes by role (metrics.jsonl: parameters, peak gradients, optimizer state, comm buffers) and its
# peak RSS. Issue #9's peer (PyTorch FSDP2) and ftune's own fsdp are not part of it yet.
# Usage: bench/sharded_cpu.sh   (repo root, after `make build`; env NPROC=2 STEPS=10
#        MEDIAN_FROM=3 PRESET=smollm2-135m SEQ=256 MICRO_BATCH=1 FTUNE_BIN=build/bin/ftune)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
STEPS=${STEPS:-10}
MEDIAN_FROM=${MEDIAN_FROM:-3}
PRESET=${PRESET:-smollm2-135m}
SEQ=${SEQ:-256}
MB=${MICRO_BATCH:-1}
PY=${PYTHON:-.venv/bin/python}
FT=${FTUNE_BIN:-build/bin/ftune}
W=runs/bench_sharded
MODEL=$W/models/$PRESET
mkdir -p "$W/models" "$W/out"
[ -f "$MODEL/config.json" ] || "$FT" init-model --preset "$PRESET" --out "$MODEL" >/dev/null
RES=$W/results.jsonl
: >"$RES"
echo "# $(date -u +%F) preset=$PRESET nproc=$NPROC threads/rank=1 seq=$SEQ micro_batch/rank=$MB steps=$STEPS cores=$(nproc)"
for mode in full lora; do
  for strategy in ddp zero1 zero2; do
    out=$W/out/$mode-$strategy
    rm -rf "$out"
    sets=(--set "model.path=$MODEL" --set "data.seq_len=$SEQ" --set "training.micro_batch=$MB"
          --set "training.steps=$STEPS" --set "training.threads=1" --set "training.output_dir=$out"
          --set "parallel.strategy=$strategy" --set "logging.peak_flops=1e10")
    config=bench/configs/train_packed.yaml
    [ "$mode" = lora ] && config=bench/configs/lora_packed.yaml
    OMP_NUM_THREADS=1 /usr/bin/time -f %M -o "$out.rss" "$FT" launch --nproc "$NPROC" \
      --master-port 0 -- train --config "$config" "${sets[@]}" >"$out.log" 2>&1
    $PY - "$out" "$mode" "$strategy" "$MEDIAN_FROM" >>"$RES" <<'PYEOF'
import json, statistics, sys
out, mode, strategy, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(out + "/metrics.jsonl")]
prev, step_s = 0, []
for m in rows:
    n = m["tokens"] - prev
    prev = m["tokens"]
    step_s.append(n / m["tokens_per_s"])
sel = rows[first - 1:]
tok = statistics.median((b["tokens"] - a["tokens"]) / s for a, b, s in
                        zip(rows[first - 2:], sel, step_s[first - 1:]))
exposed = sum(m.get("comm_exposed_s", 0) for m in sel) / sum(step_s[first - 1:])
last = rows[-1]
print(json.dumps({"mode": mode, "strategy": strategy, "tokens_per_s": tok, "exposed": exposed,
                  "peak_rss_mb_max_rank": int(open(out + ".rss").read().split()[-1]) / 1024,
                  **{k: last[k] for k in last if k.startswith("held_")},
                  "comm_bytes": last.get("comm_bytes"), "final_loss": last["loss"]}))
PYEOF
  done
done
$PY - "$RES" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| mode | strategy | global tok/s | exposed comm | held MB: params / grads (peak) / optimizer / buffers | peak RSS MB (largest rank) | final loss |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    mb = lambda k: r[k] / 1e6
    print(f"| {r['mode']} | {r['strategy']} | {r['tokens_per_s']:.1f} | {100 * r['exposed']:.1f}% | "
          f"{mb('held_param_bytes'):.0f} / {mb('held_grad_bytes'):.0f} / "
          f"{mb('held_optimizer_bytes'):.0f} / {mb('held_buffer_bytes'):.0f} | "
          f"{r['peak_rss_mb_max_rank']:.0f} | {r['final_loss']:.4f} |")
PYEOF
