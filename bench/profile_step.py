"""Op-by-op profile of one full fine-tuning step: ftune (loss_tool profile: forward_loss as
train_loop runs it, backward, clip_grad_norm, fused AdamW, under LibTorch's autograd profiler)
against the minimal transformers loop of bench/peer_train.py (LlamaForCausalLM, SDPA, random ids,
labels=ids, torch.optim.AdamW, under torch.profiler), same model dir, shapes and threads.
Prints each side's top ops by self time as a share of the profiled steps, and op counts, so the
waste shows as shares even on a loaded machine (absolute times are not comparable then).
  .venv/bin/python bench/profile_step.py --model DIR [--batch 2 --seq 256 --steps 4 --threads 2
      --clip 1.0 --wd 0.01 --docs 1 --tool build/bin/loss_tool --top 25]
--docs K > 1 gives ftune K documents per row with the block-diagonal mask (the packed recipe's
attention); the peer always runs is_causal."""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile


def self_times(events):
    """{name: (self_us, count)} from complete ('X') events, nested per thread by time."""
    out = collections.defaultdict(lambda: [0.0, 0])
    by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack = []  # [end, name, child_us]
        def pop():
            end, name, child, dur = stack.pop()
            out[name][0] += dur - child
            out[name][1] += 1
        for e in evs:
            ts, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= ts:
                pop()
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, e["name"], 0.0, dur])
        while stack:
            pop()
    return out


def report(title, times, steps, top):
    total = sum(t for t, _ in times.values())
    print(f"\n## {title}: {total / 1e6 / steps:.3f} s of op self time per step")
    print("| op | share | ms/step | calls/step |")
    print("|---|---|---|---|")
    for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name} | {100 * t / total:.1f}% | {t / 1e3 / steps:.1f} | {n / steps:.0f} |")


def peer(a, trace):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(a.threads)
    m = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=a.wd)
    g = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, m.config.vocab_size, (a.batch, a.seq), generator=g)
        opt.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(m.parameters(), a.clip)
        opt.step()

    step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(a.steps - 1):
            step()
    p.export_chrome_trace(trace)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--plain-loss", action="store_true", help="ftune with full logits")
    ap.add_argument("--tool", default="build/bin/loss_tool")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--side", choices=["both", "ftune", "peer"], default="both")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.side in ("both", "ftune"):
            t = os.path.join(tmp, "ftune.json")
            r = subprocess.run([a.tool, "profile", "--model", a.model, "--batch", str(a.batch),
                                "--seq", str(a.seq), "--steps", str(a.steps), "--docs", str(a.docs),
                                "--clip", str(a.clip), "--wd", str(a.wd), "--trace", t,
                                *(["--plain"] if a.plain_loss else [])],
                               capture_output=True, text=True, check=True)
            print("ftune step_s:", r.stdout.strip())
            report(f"ftune (docs {a.docs}, clip {a.clip}, wd {a.wd})",
                   self_times(json.load(open(t))), a.steps - 1, a.top)
        if a.side in ("both", "peer"):
            t = os.path.join(tmp, "peer.json")
            peer(a, t)
            ev = json.load(open(t))
            ev = ev["traceEvents"] if isinstance(ev, dict) else ev
            # Python-function and profiler-step events are not ops.
            ev = [e for e in ev if e.get("cat", "cpu_op") == "cpu_op"]
            report(f"transformers (is_causal, clip {a.clip}, wd {a.wd})", self_times(ev),
                   a.steps - 1, a.top)


if __name__ == "__main__":
    sys.exit(main())
