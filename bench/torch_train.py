"""Peer for `ftune train` (bench/train_cpu.sh): a plain PyTorch training loop over transformers'
LlamaForCausalLM from the same model dir: fixed-length packed rows (bench/hf_train.py's data
helpers), forward + backward + clip_grad_norm_ + torch.optim.AdamW + a transformers LR schedule,
no Trainer. --block-mask gives the model the same block-diagonal 4-D mask and per-document
positions that ftune's packing uses (otherwise plain causal attention). Prints one JSON line."""
import argparse
import json
import sys
import time

import torch

from hf_train import flops_per_token, load_alpaca, load_model, packed_rows


def block_mask(seg):
    """[B,1,T,T] bool (true = may attend): causal within a segment, as ftune's packed rows."""
    T = seg.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return ((seg.unsqueeze(2) == seg.unsqueeze(1)) & causal).unsqueeze(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--block-mask", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    examples = load_alpaca(a.data, tok)
    model = load_model(a.model)
    ids, labels, seg, pos = packed_rows(examples, a.seq_len, a.steps * a.micro_batch)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    sched = get_cosine_schedule_with_warmup(opt, a.warmup, a.steps)

    dts, losses = [], []
    for s in range(a.steps):
        t0 = time.perf_counter()
        rows = slice(s * a.micro_batch, (s + 1) * a.micro_batch)
        x, y = ids[rows], labels[rows]
        kw = {}
        if a.block_mask:
            kw = {"attention_mask": block_mask(seg[rows]), "position_ids": pos[rows]}
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=y, **kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        dts.append(time.perf_counter() - t0)
    print(json.dumps({
        "impl": "torch_loop" + ("_blockmask" if a.block_mask else ""), "mode": "packed",
        "params": sum(p.numel() for p in model.parameters()), "micro_batch": a.micro_batch,
        "seq_len": a.seq_len, "steps": a.steps, "threads": torch.get_num_threads(),
        "step_s": dts, "step_tokens": [a.micro_batch * a.seq_len] * a.steps,
        "flops_per_token": flops_per_token(model, a.seq_len), "final_loss": losses[-1]}))

if __name__ == "__main__":
    sys.exit(main())
