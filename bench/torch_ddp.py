"""PyTorch DDP peer of `ftune train` with parallel.strategy=ddp (bench/ddp_cpu.sh): one rank of
torch.nn.parallel.DistributedDataParallel (Gloo) over transformers' LlamaForCausalLM (SDPA, fp32),
full fine-tuning or --lora (PEFT, every linear, dropout 0), started by torchrun:
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 bench/torch_ddp.py --model DIR
      --data data/sample_train.jsonl --threads 1 --steps 12 [--lora] [--batches OUT/batches]
Each rank does what an ftune DDP rank does: micro_batch rows per micro-step (rank r takes rows
[r*mb, (r+1)*mb) of each global micro-batch of mb*world rows), grad_accum micro-steps with
no_sync() but the last, the summed loss divided by the global target count (one all-reduce of the
count before the forward, one of the loss after the backward), clip_grad_norm_, fused AdamW +
cosine, weight decay on params with >= 2 dims. Rows: ftune's own dumped per-rank micro-batches
(--batches: <dir>/rank<r>/step-N.safetensors; with --lora the adapter ftune started from,
<dir>/initial_adapter), else packed alpaca rows cut here as ftune does (bench/hf_train.py). The
attention is ftune's: the block-diagonal mask, or none (SDPA causal) when every target lies in its
row's first segment. DDP runs with bucket_cap_mb (25, as ftune), gradient_as_bucket_view and no
buffer broadcast (the rotary buffer is constant): PyTorch's fastest settings for this model.
Exposed communication per step = the blocking count/loss all-reduces + the time backward() of the
synchronizing micro-step still runs after the last gradient was accumulated (post-accumulate-grad
hooks): what DDP's finalize waits on the bucket all-reduces compute did not hide.
Rank 0 prints one JSON line (per-step seconds, global tokens, exposed seconds, losses; each rank's
peak RSS)."""
import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from hf_train import load_alpaca, packed_rows
from torch_train import block_mask


def causal_ok(labels, first_seg):
    """ftune's Batch::causal: no target outside its row's first segment, so plain causal
    attention gives the same loss as the block mask."""
    return not bool(((labels != -100) & ~first_seg).any())


def micro(ids, labels, pos, mask):
    first = mask[:, 0, :, 0]  # [B, T]: the tokens that may attend to token 0 = the first segment
    causal = causal_ok(labels, first)
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "attention_mask": None if causal else mask,
            "targets": int((labels[:, 1:] != -100).sum())}


def dumped_steps(batch_dir, rank, steps, grad_accum, micro_batch, seq_len):
    """ftune's per-rank dumps (training.dump_batches under DDP), every step read up front."""
    from safetensors.torch import load_file
    out = []
    for s in range(1, steps + 1):
        t = load_file(os.path.join(batch_dir, f"rank{rank}", f"step-{s}.safetensors"))
        n = len([k for k in t if k.endswith(".input_ids")])
        if n != grad_accum or tuple(t["mb0.input_ids"].shape) != (micro_batch, seq_len):
            shape = tuple(t["mb0.input_ids"].shape)
            sys.exit(f"{batch_dir}: step {s}: {n} micro-batches of {shape}, expected {grad_accum}"
                     f" of ({micro_batch}, {seq_len})")
        out.append([micro(t[f"mb{i}.input_ids"], t[f"mb{i}.labels"], t[f"mb{i}.positions"],
                          t[f"mb{i}.attn_mask"].bool()) for i in range(n)])
    return out


def packed_steps(model_dir, data, rank, world, steps, grad_accum, micro_batch, seq_len):
    """Packed rows of the alpaca file in file order (no shuffle), ftune's labelling: a segment's
    first label is -100 (the shift never crosses a document boundary)."""
    from transformers import AutoTokenizer
    ids, labels, seg, pos = packed_rows(load_alpaca(data, AutoTokenizer.from_pretrained(model_dir)),
                                        seq_len, steps * grad_accum * world * micro_batch)
    labels = labels.masked_fill(pos == 0, -100)
    mask = block_mask(seg)
    out = []
    for s in range(steps):
        out.append([])
        for i in range(grad_accum):
            r0 = ((s * grad_accum + i) * world + rank) * micro_batch
            rows = slice(r0, r0 + micro_batch)
            out[-1].append(micro(ids[rows], labels[rows], pos[rows], mask[rows]))
    return out


class GradReadyClock:
    """perf_counter() of the last gradient accumulation in the current backward."""

    def __init__(self, params):
        self.t = 0.0
        for p in params:
            p.register_post_accumulate_grad_hook(self._mark)

    def _mark(self, _):
        self.t = time.perf_counter()


def peer_args(ap):
    """The arguments every bench peer of a distributed ftune run takes (torch_ddp, torch_fsdp)."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="data/sample_train.jsonl")
    ap.add_argument("--batches", default="", help="ftune's dump dir (<out>/batches)")
    ap.add_argument("--adapter", default="", help="PEFT adapter to start from (--lora)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per rank per micro-step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--threads", type=int, default=1)


def peer_setup(a):
    """Threads, the Gloo group and the fp32 model (+ PEFT adapters with --lora), in train mode."""
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                             attn_implementation="sdpa")
    if a.lora:
        from peft import LoraConfig, PeftModel, get_peft_model
        if a.adapter:
            model = PeftModel.from_pretrained(model, a.adapter, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(
                r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, bias="none",
                task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"]))
    model.train()
    return dist.get_rank(), dist.get_world_size(), model


def peer_optimizer(named, a):
    """Fused AdamW (weight decay on >= 2-dim params) + cosine without warmup, and the rows."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW([{"params": [p for n, p in named if p.dim() >= 2],
                              "weight_decay": a.weight_decay},
                             {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=a.lr, fused=True)
    return opt, get_cosine_schedule_with_warmup(opt, 0, a.steps)


def peer_steps(a, rank, world):
    if a.batches:
        return dumped_steps(a.batches, rank, a.steps, a.grad_accum, a.micro_batch, a.seq_len)
    return packed_steps(a.model, a.data, rank, world, a.steps, a.grad_accum, a.micro_batch,
                        a.seq_len)


def reduce(x, dtype):
    """A blocking all-reduce of one number; returns it and its seconds."""
    t = torch.tensor([x], dtype=dtype)
    t0 = time.perf_counter()
    dist.all_reduce(t)
    return t.item(), time.perf_counter() - t0


def peer_loss(model, m, denom, world):
    """One micro-batch's forward and backward; returns its loss (local target sum / global
    targets). The backward runs on loss x world: DDP and FSDP average gradients over ranks, while
    ftune's loss is a global sum."""
    loss = model(input_ids=m["input_ids"], labels=m["labels"], position_ids=m["position_ids"],
                 attention_mask=m["attention_mask"], num_items_in_batch=denom).loss
    (loss * world).backward()
    return loss


def peer_loop(steps, params, opt, sched, clip, micro_step):
    """The timed optimizer steps of a peer: the global target count, each micro-batch through
    micro_step(last, m, denom) -> (loss, seconds it waited on communication), the loss sum,
    clip_grad_norm_, AdamW and the schedule. Returns per step: seconds, seconds blocked on
    communication, loss, target count."""
    dist.barrier()
    dts, waits, losses, targets_log = [], [], [], []
    for mbs in steps:
        t0 = time.perf_counter()
        targets, wait = reduce(sum(m["targets"] for m in mbs), torch.int64)
        denom = max(targets, 1)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i, m in enumerate(mbs):
            loss, w = micro_step(i == len(mbs) - 1, m, denom)
            wait += w
            loss_sum += loss.item() * denom
        loss_sum, w = reduce(loss_sum, torch.float64)
        wait += w
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        dts.append(time.perf_counter() - t0)
        waits.append(wait)
        losses.append(loss_sum / denom)
        targets_log.append(targets)
    return dts, waits, losses, targets_log


def main():
    ap = argparse.ArgumentParser()
    peer_args(ap)
    ap.add_argument("--bucket-mb", type=float, default=25)
    a = ap.parse_args()
    rank, world, model = peer_setup(a)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    clock = GradReadyClock(params)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=a.bucket_mb, gradient_as_bucket_view=True, broadcast_buffers=False)
    opt, sched = peer_optimizer(named, a)
    steps = peer_steps(a, rank, world)

    def micro_step(last, m, denom):
        with contextlib.nullcontext() if last else ddp.no_sync():
            loss = peer_loss(ddp, m, denom, world)  # DDP averages over ranks
            return loss, max(0.0, time.perf_counter() - clock.t) if last else 0.0

    dts, exposed, losses, targets_log = peer_loop(steps, params, opt, sched, a.clip, micro_step)

    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if rank == 0:
        print(json.dumps({
            "impl": "torch_ddp_lora" if a.lora else "torch_ddp", "world": world,
            "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "seq_len": a.seq_len,
            "steps": a.steps, "threads": torch.get_num_threads(),
            "rows": "ftune_dump" if a.batches else "packed_file_order",
            "causal_micro_batches": sum(m["attention_mask"] is None for s in steps for m in s),
            "trainable": sum(p.numel() for p in params),
            "allreduce_payload_bytes": sum(p.numel() * p.element_size() for p in params),
            "step_s": dts,
            "step_tokens": [world * a.grad_accum * a.micro_batch * a.seq_len] * a.steps,
            "step_comm_exposed_s": exposed, "losses": losses, "step_targets": targets_log,
            "final_loss": losses[-1], "self_peak_rss_bytes": rss}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
