"""`ftune bench --strategies` (issue 11 item 3): the full matrix on the tiny preset, read back from
its own output files. single, ddp, zero1, zero2, fsdp and pipeline x full, LoRA and QLoRA x with and
without activation checkpointing, 2 ranks: every cell runs, its measured step peak (rank 0's live
tensor bytes) is within 10% of `ftune memory`'s prediction for it, cells of one method train the
same global batch (equal final losses across strategies), summary.csv agrees with summary.json,
report.md shows every run, and scripts/plot_bench.py draws its four charts."""
import csv
import json
import subprocess
import sys

import pytest

from ftune_testing import SOURCE_DIR, ftune

STRATEGIES = ["single", "ddp", "zero1", "zero2", "fsdp", "pipeline"]
METHODS = ["full", "lora", "qlora"]
SETS = ["training.steps=3", "logging.log_every=1", "data.valid=", "training.threads=1",
        "logging.peak_flops=1e10", "data.seq_len=256", "training.micro_batch=4"]


def run_bench(out, sets, timeout):
    """The whole matrix at 2 ranks into `out`; returns (out, summary.json)."""
    args = ["bench", "--config", SOURCE_DIR / "configs" / "tiny_full.yaml", "--strategies",
            ",".join(STRATEGIES), "--nproc", "2", "--methods", ",".join(METHODS), "--grad-ckpt",
            "both", "--out", out]
    for s in sets:
        args += ["--set", s]
    ftune(*args, cwd=SOURCE_DIR, timeout=timeout)
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("bench"), SETS, 900)


def check_every_cell_within_10_percent(runs):
    """Every cell of the matrix ran, and its measured/predicted memory is in [0.9, 1.1]."""
    assert len(runs) == len(STRATEGIES) * len(METHODS) * 2
    assert all(r["ok"] for r in runs), [r.get("error") for r in runs if not r["ok"]]
    ratios = {r["name"]: round(r["memory_ratio"], 3) for r in runs}
    print("measured/predicted:", ratios)
    bad = {k: v for k, v in ratios.items() if not 0.9 <= v <= 1.1}
    assert not bad, f"measured/predicted outside [0.9, 1.1]: {bad}"


def check_equal_losses(runs):
    """Cells of one method and checkpointing train the same global batch: equal final losses."""
    by_cell = {}
    for r in runs:
        by_cell.setdefault((r["method"], r["grad_ckpt"]), []).append(r["final_loss"])
    for cell, losses in by_cell.items():
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), (cell, losses)


def test_every_cell_runs_and_memory_is_within_10_percent(bench):
    _, summary = bench
    runs = summary["runs"]
    check_every_cell_within_10_percent(runs)
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["steps"] == 3


# The SmolLM2-135M shape (random init, 135M parameters, tied embedding): model states weigh as
# much as activations here, unlike the tiny preset. The same 36 cells at 2 rows x 128 tokens, two
# steps each (slow suite: ~40 minutes on two cores, most of it the QLoRA cells' NF4 quantization).
SMOLLM2_SETS = ["model.path=preset:smollm2-135m", "training.steps=2", "logging.log_every=1",
                "data.valid=", "training.threads=1", "logging.peak_flops=1e10", "data.seq_len=128",
                "training.micro_batch=2"]


@pytest.fixture(scope="module")
def bench_smollm2(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("bench_smollm2"), SMOLLM2_SETS, 3500)


def test_smollm2_shape_every_cell_within_10_percent(bench_smollm2):
    _, summary = bench_smollm2
    check_every_cell_within_10_percent(summary["runs"])
    check_equal_losses(summary["runs"])


def test_equal_work_gives_equal_losses(bench):
    _, summary = bench
    check_equal_losses(summary["runs"])


def test_csv_report_and_charts(bench):
    out, summary = bench
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["name"] for r in rows] == [r["name"] for r in summary["runs"]]
    for row, r in zip(rows, summary["runs"]):
        assert float(row["tokens_per_s"]) == pytest.approx(r["tokens_per_s"])
        assert int(row["measured_peak_bytes"]) == r["measured_peak_bytes"]
    report = (out / "report.md").read_text()
    assert all(f"| {r['name']} |" in report for r in summary["runs"])
    subprocess.run([sys.executable, SOURCE_DIR / "scripts" / "plot_bench.py", out], check=True)
    for png in ["tokens_per_s.png", "memory.png", "loss.png", "comm_exposed.png"]:
        assert (out / png).stat().st_size > 10_000, png
        assert f"({png})" in report


@pytest.mark.parametrize("args,needle", [
    (["--strategies", "ddp,warp"], "--strategies: unknown strategy \"warp\""),
    (["--strategies", "ddp", "--methods", "full,dora"], "--methods: unknown method \"dora\""),
    (["--strategies", "ddp", "--grad-ckpt", "maybe"], "--grad-ckpt: expected off, on or both"),
    (["--strategies", "ddp", "--nproc", "1"], "--nproc: the distributed strategies need at least 2"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    p = ftune("bench", "--config", SOURCE_DIR / "configs" / "tiny_full.yaml", "--out", tmp_path,
              *args, check=False, cwd=SOURCE_DIR)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_config_with_lora_is_refused(tmp_path):
    p = ftune("bench", "--config", SOURCE_DIR / "configs" / "tiny_full.yaml", "--strategies", "ddp",
              "--out", tmp_path, "--set", "lora.r=4", check=False, cwd=SOURCE_DIR)
    assert p.returncode == 1 and "has a lora or quant section" in p.stderr
