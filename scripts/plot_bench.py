#!/usr/bin/env python3
"""Charts of an `ftune bench --strategies` run (issue 11 item 3), from its summary.json and each
run's metrics.jsonl, written next to report.md, which links them:

  tokens_per_s.png   throughput per run
  memory.png         the predicted breakdown of rank 0's peak, stacked, with the measured peak
  loss.png           the loss curves of every run
  comm_exposed.png   the share of each step spent waiting on communication, by run

Run from the venv (ftune itself runs no Python):  .venv/bin/python scripts/plot_bench.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Stacked memory components (keys of memory.json's predicted breakdown), bottom to top.
STACK = [("weights", "weights"), ("gradients", "gradients"), ("master_weights", "master weights"),
         ("optimizer_states", "optimizer states"), ("frozen_base", "frozen base"),
         ("ftune_extra", "ftune extra"), ("activations", "activations"), ("logits", "loss"),
         ("gathered_params", "gathered"), ("comm_buffers", "comm buffers"),
         ("backward_temps", "backward temps")]


def load(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    runs = [r for r in summary["runs"] if r.get("ok")]
    if not runs:
        sys.exit(f"plot_bench: {out}/summary.json has no successful run")
    return summary, runs


def bar(runs, key, ylabel, title, path, scale=1.0, fmt="{:.0f}"):
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.45 * len(runs) + 3)), 4.5))
    names = [r["name"] for r in runs]
    values = [r.get(key, 0) * scale for r in runs]
    bars = ax.bar(names, values, color="#4C72B0")
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_chart(runs, path):
    fig, ax = plt.subplots(figsize=(min(18, max(6, 0.45 * len(runs) + 4)), 5))
    names = [r["name"] for r in runs]
    bottom = [0.0] * len(runs)
    for key, label in STACK:
        vals = [r.get("predicted_breakdown", {}).get(key, 0) / 1e6 for r in runs]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
    measured = [r.get("measured_peak_bytes", 0) / 1e6 for r in runs]
    predicted = [r.get("predicted_peak_bytes", 0) / 1e6 for r in runs]
    ax.scatter(names, predicted, marker="_", s=900, color="black", label="predicted peak", zorder=3)
    ax.scatter(names, measured, marker="o", color="red", label="measured peak", zorder=4)
    ax.set_ylabel("MB (rank 0)")
    ax.set_title("Memory: the predicted components (stacked; not all coexist) and the peaks")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_chart(runs, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        rows = [json.loads(line) for line in
                (Path(r["output_dir"]) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        pts = [(x["step"], x["loss"]) for x in rows if "loss" in x]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss curves (same global batch in every run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: plot_bench.py OUT_DIR (an `ftune bench --strategies` output)")
    out = Path(sys.argv[1])
    _, runs = load(out)
    bar(runs, "tokens_per_s", "tokens/s", "Throughput", out / "tokens_per_s.png")
    memory_chart(runs, out / "memory.png")
    loss_chart(runs, out / "loss.png")
    bar(runs, "comm_exposed_frac", "% of step time", "Exposed communication",
        out / "comm_exposed.png", scale=100, fmt="{:.1f}")
    print(f"plot_bench: {out}/tokens_per_s.png, memory.png, loss.png, comm_exposed.png")


if __name__ == "__main__":
    main()
