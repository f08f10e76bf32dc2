"""Per-step seconds and tokens of an `ftune train` run (log_every 1) from its metrics.jsonl, as
the bench scripts' peers report them. Prints one JSON line.
Usage: ftune_steps.py METRICS_JSONL"""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1])]
prev, step_s, step_tokens = 0, [], []
for m in rows:  # log_every 1: one line per step; tokens are cumulative
    n = m["tokens"] - prev
    prev = m["tokens"]
    step_tokens.append(n)
    step_s.append(n / m["tokens_per_s"])
print(json.dumps({"step_s": step_s, "step_tokens": step_tokens, "mfu_logged": rows[-1]["mfu"],
                  "final_loss": rows[-1]["loss"],
                  "step_targets": [m["target_tokens"] for m in rows]}))
