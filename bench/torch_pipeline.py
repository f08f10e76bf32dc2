"""PyTorch pipeline-parallel peer of `ftune train` with parallel.strategy=pipeline
(bench/pipeline_cpu.sh): one rank = one stage of transformers' LlamaForCausalLM (SDPA causal,
fp32) driven by torch.distributed.pipelining (PipelineStage + ScheduleGPipe / Schedule1F1B, Gloo,
CPU), started by torchrun, one process per stage:
  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 bench/torch_pipeline.py
      --model DIR_OR_CONFIG_JSON --schedule 1f1b --grad-accum 4 --micro-batch 1 --seq-len 256
      --steps 10 [--micro-batches M] [--warmup 2]
Stages split at layer boundaries: rank r of P holds layers [r*L/P, (r+1)*L/P); rank 0 also the
embeddings, the last rank the final norm, lm_head and the loss (transformers' ForCausalLMLoss: the
sum of token NLL / the step's global target count, as the other peers; scale_grads=False). Each
stage is built on the meta device and materialized alone, so a rank's peak RSS is its stage's:
the weights of DIR/model.safetensors when there is one (ftune init-model), else a random init from
the config.json (seeded). Tied embeddings: the last stage's lm_head starts from rank 0's embedding
and the two gradients are summed before the optimizer step.
Rows: random token ids (--seed), every row --seq-len long, every token a target. A step is
--grad-accum (G) micro-batches of --micro-batch rows; the schedule runs G/M rounds of M
micro-batches (M = --micro-batches, default G, as ftune's parallel.micro_batches). "naive" =
ScheduleGPipe with 1 micro-batch per round, G rounds: each micro-batch goes through every stage
and back before the next starts (plain gradient accumulation, one stage busy at a time).
Schedule1F1B refuses M < P (torch's own check): such a run prints {"unsupported": torch's message}
and exits 0.
The optimizer step and its timing are bench/torch_ddp.py's (peer_optimizer, peer_loop): fused
AdamW + cosine, weight decay on >= 2-dim params; --clip inf = no clipping (clip_grad_norm_ still
computes the stage-local norm; a finite --clip would clip per stage, not globally, so it is
refused). --warmup untimed steps first (shape inference runs on the first).
Rank 0 prints one JSON line: tokens_per_s over the timed steps, per-step seconds and losses, each
stage's peak RSS (getrusage), and each stage's share of step time spent waiting (the schedule's P2P
waits: its bubble plus transfers; plus the step's blocking target-count / loss all-reduces and the
tied-gradient all-reduce): the peer's side of ftune's measured bubble.
Checked on 2 ranks x 1 thread (torch 2.11, Gloo, CPU): naive, gpipe and 1f1b run; their per-step
losses equal a single-process LlamaForCausalLM's on the same rows and optimizer to ~1e-7 relative
(hidden 64, 4 layers, vocab 256, seq 32, M = 1 and 4, tied and untied embeddings)."""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from torch_ddp import peer_args, peer_loop, peer_optimizer

SCHEDULES = ("naive", "gpipe", "1f1b")


class Stage(nn.Module):
    """Layers [lo, hi) of a LlamaForCausalLM, with the embeddings on the first stage and the norm
    and lm_head on the last. In: token ids [B, T] (first) or hidden states [B, T, H]; out: hidden
    states [B, T, H], or logits [B, T, V] on the last stage."""

    def __init__(self, full, lo, hi, first, last):
        super().__init__()
        self.embed = full.model.embed_tokens if first else None
        self.layers = nn.ModuleList(full.model.layers[lo:hi])
        self.norm = full.model.norm if last else None
        self.lm_head = full.lm_head if last else None
        self.rotary = full.model.rotary_emb
        self.lo = lo

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x  # [B, T, H]
        pos = torch.arange(h.shape[1]).unsqueeze(0)  # [1, T]
        pe = self.rotary(h, pos)  # (cos, sin), each [1, T, head_dim]
        for layer in self.layers:  # attention_mask None: SDPA's is_causal path, as LlamaModel
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h))  # [B, T, V]

    def full_name(self, name, tied):
        """This stage's parameter name -> its key in the HF checkpoint."""
        head, _, rest = name.partition(".")
        if head == "layers":
            i, _, rest = rest.partition(".")
            return f"model.layers.{self.lo + int(i)}.{rest}"
        if head == "lm_head" and tied:
            return "model.embed_tokens.weight"
        return {"embed": "model.embed_tokens", "norm": "model.norm"}.get(head, head) + "." + rest


def load_config(path):
    from transformers import LlamaConfig
    cfg = LlamaConfig.from_json_file(path if path.endswith(".json")
                                     else os.path.join(path, "config.json"))
    cfg._attn_implementation = "sdpa"
    return cfg


def build_stage(a, cfg, rank, world):
    """This rank's Stage, materialized alone on the CPU in fp32 (checkpoint weights or a seeded
    random init); the tied lm_head is rank 0's embedding (broadcast)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    L = cfg.num_hidden_layers
    if world > L:
        sys.exit(f"{a.model}: {world} stages for {L} layers (at most one stage per layer)")
    with torch.device("meta"):
        full = LlamaForCausalLM(cfg)
    lo, hi = rank * L // world, (rank + 1) * L // world
    stage = Stage(full, lo, hi, rank == 0, rank == world - 1)
    stage.rotary = None  # its inv_freq buffer is computed at construction: rebuilt on the CPU
    stage.to_empty(device="cpu")
    stage.rotary = LlamaRotaryEmbedding(cfg)
    tied = bool(cfg.tie_word_embeddings)
    weights = "" if a.model.endswith(".json") else os.path.join(a.model, "model.safetensors")
    if weights and os.path.exists(weights):
        from safetensors import safe_open
        with safe_open(weights, "pt") as f, torch.no_grad():
            for n, p in stage.named_parameters():
                p.copy_(f.get_tensor(stage.full_name(n, tied)).float())
    else:
        torch.manual_seed(a.seed + 1 + rank)
        stage.apply(full._init_weights)
    if tied and world > 1:
        tie = tied_group(world)
        w = stage.embed.weight if rank == 0 else stage.lm_head.weight if rank == world - 1 else None
        if w is not None:
            with torch.no_grad():
                dist.broadcast(w, 0, group=tie)
        return stage, tie, w
    return stage, None, None


def tied_group(world):
    return dist.new_group([0, world - 1])  # every rank must call new_group


def make_schedule(kind, stage, m, loss_fn):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    cls = Schedule1F1B if kind == "1f1b" else ScheduleGPipe
    return cls(stage, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)


class P2PWaitClock:
    """Seconds this rank spends in the schedule's P2P waits (torch.distributed.pipelining's
    schedules._wait_batch_p2p, a private helper): its bubble plus transfer time."""

    def __init__(self):
        from torch.distributed.pipelining import schedules
        self.s = 0.0
        inner = schedules._wait_batch_p2p

        def timed(work):
            t0 = time.perf_counter()
            inner(work)
            self.s += time.perf_counter() - t0

        schedules._wait_batch_p2p = timed


def random_steps(a, n, rounds, rows, vocab, last):
    """n steps of `rounds` dicts of `rows` random rows [rows, T] each; every token a target, counted
    on the last stage only (peer_loop sums the counts over ranks)."""
    g = torch.Generator().manual_seed(a.seed)
    out = []
    for _ in range(n):
        step = []
        for _ in range(rounds):
            ids = torch.randint(0, vocab, (rows, a.seq_len), generator=g)
            step.append({"input_ids": ids, "targets": rows * (a.seq_len - 1) if last else 0})
        out.append(step)
    return out


def main():
    ap = argparse.ArgumentParser()
    peer_args(ap)
    ap.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    ap.add_argument("--micro-batches", type=int, default=0,
                    help="M: micro-batches per schedule round (default --grad-accum)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before --steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.set_defaults(clip=math.inf)
    a = ap.parse_args()
    if a.lora or a.batches or a.adapter:
        sys.exit("torch_pipeline.py: --lora, --batches and --adapter are not supported")
    if math.isfinite(a.clip):
        sys.exit("torch_pipeline.py: --clip must be inf (stage-local clipping is not ftune's)")
    m = a.micro_batches or a.grad_accum
    if a.grad_accum % m:
        sys.exit(f"--grad-accum {a.grad_accum} is not a multiple of --micro-batches {m}")
    m_round = 1 if a.schedule == "naive" else m
    rounds = a.grad_accum // m_round

    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        sys.exit("torch_pipeline.py: run with >= 2 processes (one per stage)")
    first, last = rank == 0, rank == world - 1
    cfg = load_config(a.model)
    info = {"impl": "torch_pipelining", "schedule": a.schedule, "stages": world,
            "micro_batches": m, "grad_accum": a.grad_accum, "rounds_per_step": rounds,
            "micro_batch": a.micro_batch, "seq_len": a.seq_len, "steps": a.steps,
            "warmup_steps": a.warmup, "threads": torch.get_num_threads(), "rows": "random_ids"}
    stage_mod, tie, tied_w = build_stage(a, cfg, rank, world)
    stage_mod.train()
    from torch.distributed.pipelining import PipelineStage
    stage = PipelineStage(stage_mod, rank, world, torch.device("cpu"))
    from transformers.loss.loss_utils import ForCausalLMLoss
    denom = [1]

    def loss_fn(logits, labels):  # one micro-batch: its NLL sum / the step's global targets
        return ForCausalLMLoss(logits, labels, cfg.vocab_size, num_items_in_batch=denom[0])

    try:
        sched = make_schedule(a.schedule, stage, m_round, loss_fn)
    except ValueError as e:  # Schedule1F1B: M < P (torch's own check, on every rank alike)
        if first:
            why = " ".join(str(e).split())
            print(json.dumps({**info, "unsupported": f"torch {a.schedule}: {why}"}), flush=True)
        dist.destroy_process_group()
        return 0
    named = list(stage_mod.named_parameters())
    params = [p for _, p in named]
    # the cosine schedule spans the warm-up steps too
    opt, lr_sched = peer_optimizer(named, argparse.Namespace(**{**vars(a),
                                                                "steps": a.warmup + a.steps}))
    steps = random_steps(a, a.warmup + a.steps, rounds, m_round * a.micro_batch, cfg.vocab_size,
                         last)
    clock = P2PWaitClock()

    def micro_step(last_round, mb, d):  # one schedule round of m_round micro-batches
        denom[0] = d
        losses = []
        w0 = clock.s
        if first:
            sched.step(mb["input_ids"], return_outputs=False)
        elif last:
            sched.step(target=mb["input_ids"], losses=losses, return_outputs=False)
        else:
            sched.step(return_outputs=False)
        wait = clock.s - w0
        if last_round and tied_w is not None:  # tied embedding: both stages step on the sum
            t0 = time.perf_counter()
            dist.all_reduce(tied_w.grad, group=tie)
            wait += time.perf_counter() - t0
        return (torch.stack(losses).sum() if losses else torch.zeros(())), wait

    peer_loop(steps[:a.warmup], params, opt, lr_sched, a.clip, micro_step)
    dts, waits, losses, targets_log = peer_loop(steps[a.warmup:], params, opt, lr_sched, a.clip,
                                                micro_step)

    step_tokens = a.grad_accum * a.micro_batch * a.seq_len
    mine = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "wait_share": sum(waits) / sum(dts), "params": sum(p.numel() for p in params),
            "layers": len(stage_mod.layers)}
    per = [None] * world
    dist.all_gather_object(per, mine)
    if first:
        print(json.dumps({
            **info, "tokens_per_s": step_tokens * len(dts) / sum(dts), "step_s": dts,
            "step_tokens": [step_tokens] * a.steps, "losses": losses, "step_targets": targets_log,
            "final_loss": losses[-1], "stage_layers": [p["layers"] for p in per],
            "stage_params": [p["params"] for p in per],
            "stage_peak_rss_bytes": [p["rss"] for p in per],
            "stage_wait_share": [p["wait_share"] for p in per],
            "theoretical_bubble": (world - 1) / (m_round + world - 1)}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
