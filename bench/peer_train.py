"""The minimal transformers training loop of issue 7 part 6, ftune's equal-work peer in
bench/train_cpu.sh (CASES=smollm2_equal): LlamaForCausalLM (SDPA, fp32) from an `ftune init-model`
dir, random ids, labels=ids (causal attention, every position a target), torch.optim.AdamW(lr),
zero_grad(set_to_none=True); --clip > 0 adds clip_grad_norm_, --weight-decay is AdamW's (torch's
default 0.01 decays every parameter; 0 turns it off). Prints one JSON line with per-step seconds.
  .venv/bin/python bench/peer_train.py --model DIR --seq-len 256 --micro-batch 2 --steps 15
      --threads 2 [--clip 1.0] [--weight-decay 0.01]"""
import argparse
import json
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    dts, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, model.config.vocab_size, (a.micro_batch, a.seq_len))
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        losses.append(loss.item())
        dts.append(time.perf_counter() - t0)
    print(json.dumps({
        "impl": "transformers_loop", "micro_batch": a.micro_batch, "seq_len": a.seq_len,
        "steps": a.steps, "threads": torch.get_num_threads(), "clip": a.clip,
        "weight_decay": a.weight_decay, "step_s": dts,
        "step_tokens": [a.micro_batch * a.seq_len] * a.steps, "final_loss": losses[-1]}))


if __name__ == "__main__":
    sys.exit(main())
