"""PyTorch FSDP2 peer of `ftune train` with parallel.strategy=fsdp (bench/sharded_cpu.sh): one
rank of transformers' LlamaForCausalLM (SDPA, fp32) with torch.distributed.fsdp.fully_shard applied
to every decoder layer and then to the root (Gloo, CPU, fp32 parameters, gradients and AdamW
state; no mixed precision, no CPU offload, reshard_after_forward=True = ZeRO-3), full fine-tuning
or --lora (PEFT, every linear, dropout 0), started by torchrun:
  OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 bench/torch_fsdp.py --model DIR
      --data data/sample_train.jsonl --threads 1 --steps 12 [--lora] [--batches OUT/batches]
The rows, the loss normalization (global target count) and the step are bench/torch_ddp.py's (same
helpers): micro_batch rows per rank per micro-step, grad_accum micro-steps with gradient sync off
(set_requires_gradient_sync(False)) but on the last, clip_grad_norm_ over the sharded gradients
(DTensor: the norm is reduced across ranks), AdamW + cosine with weight decay on params with >= 2
dims, fused AdamW (it takes DTensors). --offload: CPUOffloadPolicy(pin_memory=False) (sharded
parameters, gradients and the AdamW step on the CPU; pinning needs a CUDA driver, and on a CPU run
the policy changes little: it mirrors ftune's fsdp+offload row).
Checked on 2 ranks x 1 thread (torch 2.11, Gloo): FSDP2 runs on CPU, and its per-step losses
equal bench/torch_ddp.py's to the last digit on the same rows (tiny preset, 2 steps of 2
micro-batches); --offload runs too.
Exposed communication is not measured (FSDP2 overlaps its all-gathers and reduce-scatters inside
forward and backward); only the blocking count/loss all-reduces are logged.
Rank 0 prints one JSON line (per-step seconds, global tokens, losses; each rank's peak RSS)."""
import argparse
import json
import resource
import sys

import torch
import torch.distributed as dist

from torch_ddp import peer_args, peer_loop, peer_loss, peer_optimizer, peer_setup, peer_steps


def main():
    ap = argparse.ArgumentParser()
    peer_args(ap)
    ap.add_argument("--offload", action="store_true", help="FSDP2 CPUOffloadPolicy")
    a = ap.parse_args()
    rank, world, model = peer_setup(a)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kw = {"mesh": init_device_mesh("cpu", (world,)), "reshard_after_forward": True}
    if a.offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    for layer in (model.base_model.model if a.lora else model).model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)  # the root: embeddings, final norm, lm_head
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt, sched = peer_optimizer(named, a)
    steps = peer_steps(a, rank, world)

    def micro_step(last, m, denom):
        model.set_requires_gradient_sync(last)  # FSDP2's no_sync
        return peer_loss(model, m, denom, world), 0.0

    dts, waits, losses, targets_log = peer_loop(steps, params, opt, sched, a.clip, micro_step)

    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if rank == 0:
        print(json.dumps({
            "impl": "torch_fsdp2" + ("_offload" if a.offload else "") + ("_lora" if a.lora else ""),
            "world": world, "micro_batch": a.micro_batch, "grad_accum": a.grad_accum,
            "seq_len": a.seq_len, "steps": a.steps, "threads": torch.get_num_threads(),
            "rows": "ftune_dump" if a.batches else "packed_file_order",
            "trainable": sum(p.numel() for p in params), "step_s": dts,
            "step_tokens": [world * a.grad_accum * a.micro_batch * a.seq_len] * a.steps,
            "step_blocking_allreduce_s": waits, "losses": losses, "step_targets": targets_log,
            "final_loss": losses[-1], "self_peak_rss_bytes": rss}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
