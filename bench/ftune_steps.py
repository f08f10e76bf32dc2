"""Per-step seconds and tokens of an `ftune train` run (log_every 1) from its metrics.jsonl, as
the bench scripts' peers report them; under DDP also each step's exposed communication seconds
(`comm_exposed_s`) and the logged `comm_bytes` / `comm_wire_bytes` of the last step. Prints one
JSON line.
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
out = {"step_s": step_s, "step_tokens": step_tokens, "mfu_logged": rows[-1]["mfu"],
       "final_loss": rows[-1]["loss"], "losses": [m["loss"] for m in rows],
       "step_targets": [m["target_tokens"] for m in rows],
       "peak_mem_bytes_rank0": rows[-1]["peak_mem_bytes"]}
if "comm_exposed_s" in rows[-1]:
    out["step_comm_exposed_s"] = [m.get("comm_exposed_s", 0.0) for m in rows]
    out.update({k: rows[-1][k] for k in ("comm_bytes", "comm_wire_bytes") if k in rows[-1]})
print(json.dumps(out))
