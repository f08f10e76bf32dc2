"""Measures this machine's collective latency (alpha) and bandwidth (beta) for `ftune plan`: a ring
all-reduce over Gloo on loopback between `--nproc` CPU processes (torch.distributed, the transport
ftune's CPU runs use), timed over sizes from 4 KB to 32 MB, and fitted to the alpha-beta model
t = 2(n-1) alpha + 2(n-1)/n * bytes / bw (docs/plan.md); then the all-gather and reduce-scatter
of the larger sizes, which Gloo runs at a rate of their own: gather_bw = (n-1)/n * bytes / (t -
(n-1) alpha), the median. Prints one JSON object: {"alpha_s": ..., "bw_bytes_per_s": ...,
"gather_bw_bytes_per_s": ..., "points": [[bytes, seconds], ...], "gather_points": [...]}.

    .venv/bin/python scripts/gloo_alpha_beta.py --nproc 2
"""
import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20]


def median_time(reps, op):
    op()  # warm-up: Gloo sets up the pairs' buffers on first use
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    # The median: the machine is shared, and a preempted rank inflates single samples.
    return sorted(times)[len(times) // 2]


def worker(rank, n, port, reps, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    points, gather_points = [], []
    for size in SIZES:
        x = torch.ones(size // 4)
        points.append([size, median_time(reps, lambda: dist.all_reduce(x))])
        if size >= 4 << 20:  # size = the gathered tensor, as docs/plan.md counts it
            shard, full = torch.ones(size // 4 // n), torch.empty(size // 4 // n * n)
            gather_points.append(
                [size, median_time(reps, lambda: dist.all_gather_into_tensor(full, shard))])
            gather_points.append(
                [size, median_time(reps, lambda: dist.reduce_scatter_tensor(shard, full))])
    if rank == 0:
        out.put((points, gather_points))
    dist.destroy_process_group()


def fit(points, n):
    """Least squares of t = a + b * x with x = 2(n-1)/n * bytes, in relative error (weights 1/t^2,
    so the small sizes fix a and the large ones b); alpha = a / (2(n-1)), bw = 1/b."""
    xs = [2 * (n - 1) / n * s for s, _ in points]
    ws = [1 / t ** 2 for _, t in points]
    ts = [t for _, t in points]
    sw = sum(ws)
    swx = sum(w * x for w, x in zip(ws, xs))
    swt = sum(w * t for w, t in zip(ws, ts))
    swxx = sum(w * x * x for w, x in zip(ws, xs))
    swxt = sum(w * x * t for w, x, t in zip(ws, xs, ts))
    b = (sw * swxt - swx * swt) / (sw * swxx - swx ** 2)
    a = max((swt - b * swx) / sw, 0.0)
    return a / (2 * (n - 1)), 1.0 / b


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(worker, args=(a.nproc, port, a.reps, q), nprocs=a.nproc, join=True)
    points, gather_points = q.get()
    alpha, bw = fit(points, a.nproc)
    n = a.nproc
    rates = sorted((n - 1) / n * s / max(t - (n - 1) * alpha, 1e-9) for s, t in gather_points)
    print(json.dumps({"nproc": n, "alpha_s": alpha, "bw_bytes_per_s": bw,
                      "gather_bw_bytes_per_s": rates[len(rates) // 2], "points": points,
                      "gather_points": gather_points}))


if __name__ == "__main__":
    main()
