"""Peer for `ftune train` (bench/train_cpu.sh): a plain PyTorch training loop over transformers'
LlamaForCausalLM from the same model dir: fixed-length packed rows (bench/hf_train.py's data
helpers), forward + backward + clip_grad_norm_ + torch.optim.AdamW + a transformers LR schedule,
no Trainer. --block-mask gives the model the same block-diagonal 4-D mask and per-document
positions that ftune's packing uses (otherwise plain causal attention). GPU form (bench/gpu.sh):
--device cuda, --bf16 runs the forward under torch.autocast(bf16) over the fp32 weights (ftune's
model.dtype bf16), --fused uses torch.optim.AdamW(fused=True) as ftune does. Prints one JSON line
(peak_mem_bytes: CUDA max allocated over the process, or the peak RSS)."""
import argparse
import contextlib
import json
import resource
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights")
    ap.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    examples = load_alpaca(a.data, tok)
    model = load_model(a.model).to(a.device)
    ids, labels, seg, pos = packed_rows(examples, a.seq_len, a.steps * a.micro_batch)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr,
                            **({"fused": True} if a.fused else {}))
    sched = get_cosine_schedule_with_warmup(opt, a.warmup, a.steps)
    autocast = (torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16) if a.bf16
                else contextlib.nullcontext())

    dts, losses = [], []
    for s in range(a.steps):
        t0 = time.perf_counter()
        rows = slice(s * a.micro_batch, (s + 1) * a.micro_batch)
        x, y = ids[rows].to(a.device), labels[rows].to(a.device)
        kw = {}
        if a.block_mask:
            kw = {"attention_mask": block_mask(seg[rows]).to(a.device),
                  "position_ids": pos[rows].to(a.device)}
        opt.zero_grad(set_to_none=True)
        with autocast:
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
        "flops_per_token": flops_per_token(model, a.seq_len), "final_loss": losses[-1],
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if a.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))

if __name__ == "__main__":
    sys.exit(main())
