"""`ftune plan` (issue 11 item 4): the CLI's one-line errors, its JSON, the shapes any projection
must have, and (test_measured_*, slow) its projection of THIS machine against measured `ftune
train --nproc 2` step times under ddp, zero2 and fsdp, within 25%.

The validation describes the machine with measured figures only, each measured apart from the runs
it predicts: the collective latency and bandwidth from a Gloo all-reduce between two processes
(scripts/gloo_alpha_beta.py), the memory bandwidth from a streaming add, and the compute rate from
two single-process trainings of the same shape running side by side (each "GPU" of this machine is
one of two shared cores; the single runs move no bytes). Run as a script to print the table:
    FTUNE_BIN=build/bin/ftune .venv/bin/python tests/python/test_plan.py
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftune_testing import SOURCE_DIR, ftune, ftune_bin

CONFIG = SOURCE_DIR / "configs" / "tiny_full.yaml"
STRATEGIES = ["ddp", "zero2", "fsdp"]
TOLERANCE = 0.25
# A ~12M-parameter Llama with the byte-level vocabulary of the tiny preset: FLOPs and bytes large
# enough that the step is more than fixed costs.
M12 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 259,
       "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
       "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
       "torch_dtype": "float32", "bos_token_id": 256, "eos_token_id": 257}


def plan(*args, check=True):
    return ftune("plan", *args, check=check)


def plan_json(*args):
    return json.loads(plan(*args, "--json").stdout)


def one_error_line(p):
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ftune: error: "), lines[0]
    return lines[0][len("ftune: error: "):]


@pytest.mark.parametrize("args,expected", [
    (["--gpu", "h300"], 'plan: --gpu: unknown GPU "h300" (expected h100-80gb, h200 or a100-80gb)'),
    (["--interconnect", "infiniband"],
     'plan: --interconnect: unknown interconnect "infiniband" (expected nvlink, ib or ethernet)'),
    (["--gpus", "12"], "plan: --gpus: expected a power of two >= 1, got 12"),
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "-8"], "--gpus"),
    (["--model", "llama-5"], 'plan: --model: "llama-5" is neither a preset'),
    (["--strategies", "ddp,single"], "plan: --strategies: expected ddp, zero1, zero2, fsdp or "
                                     "pipeline, got single"),
    (["--strategies", "zero4"], "plan: --strategies"),
    (["--lora-r", "8192"], "plan: --lora-r: 8192 exceeds the dims of"),
    (["--pp", "64"], "plan: --pp: 64 stages for 32 decoder layers"),
    (["--micro-batch", "-1"], "--micro-batch"),
    (["--efficiency", "1.5"], "--efficiency"),
    (["--dtype", "fp8"], "plan: --dtype"),
    (["--global-batch", "64", "--grad-accum", "2"], "--global-batch"),
])
def test_bad_input_is_one_clear_line(args, expected):
    base = {"--model": "llama-2-7b", "--gpus": "64"}
    for i in range(0, len(args) - 1, 2):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    line = one_error_line(plan(*flat, *args, check=False))
    assert expected in line, line


def test_json_shape_and_rows():
    j = plan_json("--model", "llama-2-7b", "--gpus", "1024", "--interconnect", "ib")
    assert j["model"]["parameters"] == 6738415616  # transformers' count for Llama-2-7B
    assert j["machine"]["inter_node"]["bytes_per_s"] == 50e9
    assert j["machine"]["intra_node"]["bytes_per_s"] == 450e9
    rows = j["rows"]
    assert [(r["gpus"], r["strategy"]) for r in rows] == [
        (n, s) for n in [8, 16, 32, 64, 128, 256, 512, 1024]
        for s in ["ddp", "zero1", "zero2", "fsdp", "pipeline"]]
    keys = {"gpus", "strategy", "dp", "pp", "micro_batches", "compute_s", "comm_s", "comm_exposed_s",
            "step_s", "tokens_per_step", "tokens_per_s", "mfu", "memory_bytes", "fits"}
    for r in rows:
        assert set(r) == keys, r
        assert r["step_s"] == pytest.approx(r["compute_s"] + r["comm_exposed_s"])
        assert 0 <= r["comm_exposed_s"] <= r["comm_s"] + 1e-12
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
        assert 0 < r["mfu"] <= 0.4 + 1e-9  # never above the assumed efficiency
        assert r["fits"] == (r["memory_bytes"] <= 80e9)
    # Full fine-tuning of 7B with AdamW: 16 Psi = 108 GB of model states fits no single replica,
    # and FSDP does at 8 GPUs (16 Psi / 8 = 13.5 GB plus activations).
    by = {(r["gpus"], r["strategy"]): r for r in rows}
    assert not by[(8, "ddp")]["fits"] and by[(8, "fsdp")]["fits"]


def test_table_has_a_row_per_cell():
    out = plan("--model", "llama-2-7b", "--gpus", "16", "--interconnect", "ethernet").stdout
    lines = [l for l in out.splitlines() if l.strip() and l.split()[0].isdigit()]
    assert [(l.split()[0], l.split()[1]) for l in lines] == [
        (n, s) for n in ["8", "16"] for s in ["ddp", "zero1", "zero2", "fsdp", "pipeline"]]
    assert "GB/GPU" in out and "exposed" in out


def test_monotonic_sanity():
    j = plan_json("--model", "llama-2-13b", "--gpus", "1024", "--micro-batch", "2",
                  "--seq-len", "4096")
    rows = j["rows"]
    for s in ["ddp", "zero1", "zero2", "fsdp", "pipeline"]:
        mine = [r for r in rows if r["strategy"] == s]
        assert all(a["tokens_per_step"] < b["tokens_per_step"] for a, b in zip(mine, mine[1:]))
    fsdp = [r["memory_bytes"] for r in rows if r["strategy"] == "fsdp"]
    assert all(b <= a for a, b in zip(fsdp, fsdp[1:])), fsdp
    # Ring all-reduce at a fixed per-GPU batch: the bytes per rank tend to 2x the payload, the
    # latency term grows, so the time grows with N.
    ddp = [r["comm_s"] for r in rows if r["strategy"] == "ddp"]
    assert all(b > a for a, b in zip(ddp, ddp[1:])), ddp
    # ddp's replica does not shrink.
    ddp_mem = {r["memory_bytes"] for r in rows if r["strategy"] == "ddp"}
    assert len(ddp_mem) == 1
    # A faster fabric never slows a step; NVLink everywhere beats InfiniBand beats Ethernet.
    t = {f: {(r["gpus"], r["strategy"]): r["step_s"] for r in plan_json(
        "--model", "llama-2-7b", "--gpus", "64", "--interconnect", f)["rows"]}
        for f in ["nvlink", "ib", "ethernet"]}
    for k in t["ib"]:
        assert t["nvlink"][k] <= t["ib"][k] <= t["ethernet"][k], k
    # Inside one node (8 GPUs) the fabric does not matter.
    assert t["ib"][(8, "ddp")] == t["ethernet"][(8, "ddp")]


def test_lora_and_qlora_move_less_and_hold_less():
    full = plan_json("--model", "llama-2-7b", "--gpus", "8", "--strategies", "ddp")["rows"][0]
    lora = plan_json("--model", "llama-2-7b", "--gpus", "8", "--strategies", "ddp",
                     "--lora-r", "16")["rows"][0]
    qlora = plan_json("--model", "llama-2-7b", "--gpus", "8", "--strategies", "ddp",
                      "--qlora")["rows"][0]
    assert lora["comm_s"] < full["comm_s"] / 100
    assert qlora["memory_bytes"] < lora["memory_bytes"] < full["memory_bytes"]
    assert qlora["compute_s"] > lora["compute_s"]  # the dequantization's slowdown


def test_global_batch_fixes_the_tokens_and_skips_what_cannot_split():
    j = plan_json("--model", "llama-2-7b", "--gpus", "128", "--global-batch", "64",
                  "--strategies", "ddp")
    rows = {r["gpus"]: r for r in j["rows"]}
    assert {rows[n]["tokens_per_step"] for n in [8, 16, 32, 64]} == {64 * 2048}
    assert rows[128]["skip"].startswith("global batch 64 is not a multiple")


def test_overrides_replace_the_datasheet():
    j = plan_json("--model", "tiny", "--gpus", "2", "--dtype", "fp32", "--measured-flops", "2e10",
                  "--interconnect-bw", "1e9", "--latency", "1e-4", "--gpu-mem", "24GB",
                  "--gather-bw", "2.5e8", "--overlap", "0")
    m = j["machine"]
    assert m["flops_per_s"] == 2e10 and m["memory_bytes"] == 24e9 and m["overlap"] == 0
    assert m["intra_node"] == m["inter_node"] == {"bytes_per_s": 1e9, "alpha_s": 1e-4,
                                                  "gather_bytes_per_s": 2.5e8}
    assert [r["gpus"] for r in j["rows"]] == [2] * 5
    # Nothing hides with --overlap 0; zero2's gathers run at --gather-bw: its reduce-scatter and
    # all-gather of the 4-byte gradients and parameters, 1/2 of 4 Psi each, plus three latency
    # terms (two gathers of one step, the norm's all-reduce of two).
    by = {r["strategy"]: r for r in j["rows"]}
    for r in j["rows"]:
        assert r["comm_exposed_s"] == pytest.approx(r["comm_s"])
    psi = j["model"]["parameters"]
    assert by["zero2"]["comm_s"] == pytest.approx(2 * 0.5 * 4 * psi / 2.5e8 + 2 * 1e-4 + 2 * 1e-4)


# --- validation on this machine (slow) ---------------------------------------------------------

def train_cmd(out, model, seq, mb, steps, nproc=1, strategy=None):
    cmd = [ftune_bin(), "train", "--config", str(CONFIG)]
    sets = [f"model.path={model}", f"data.seq_len={seq}", f"training.micro_batch={mb}",
            "training.threads=1", f"training.steps={steps}", "training.eval_every=0", "data.valid=",
            "logging.log_every=4", "logging.peak_flops=1e10", "training.resume=none",
            f"training.output_dir={out}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
        sets.append(f"parallel.strategy={strategy}")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def step_times(out: Path, tokens_per_step: int):
    """Seconds per step of each logged interval after the first (warm-up)."""
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [tokens_per_step / l["tokens_per_s"] for l in lines[1:]], lines


def run_all(cmds):
    procs = [subprocess.Popen(c, cwd=SOURCE_DIR, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    for p, c in zip(procs, cmds):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{c}: {err[-2000:]}"


def memory_bandwidth():
    """Bytes/s of a streaming a += b on one thread (the optimizer step's access pattern)."""
    import torch
    torch.set_num_threads(1)
    a, b = torch.ones(1 << 24), torch.ones(1 << 24)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - t0)
    return 3 * a.numel() * 4 / statistics.median(times)


def gloo_alpha_beta():
    p = subprocess.run([sys.executable, str(SOURCE_DIR / "scripts" / "gloo_alpha_beta.py"),
                        "--nproc", "2", "--reps", "7"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def validate(tmp: Path, shapes=None):
    """Measures, projects and compares; returns a list of dicts, one per (shape, strategy)."""
    tmp.mkdir(parents=True, exist_ok=True)
    m12 = tmp / "m12"
    if not (m12 / "config.json").exists():
        (tmp / "m12_config.json").write_text(json.dumps(M12))
        ftune("init-model", "--config", tmp / "m12_config.json", "--out", m12, "--force")
    shapes = shapes or [("tiny", "preset:tiny", 256, 4, 24), ("m12", str(m12), 128, 2, 16)]
    link = gloo_alpha_beta()
    mem_bw = memory_bandwidth()
    rows = []
    for name, model, seq, mb, steps in shapes:
        j = json.loads(ftune("plan", "--model", model.removeprefix("preset:"), "--gpus", "1",
                             "--dtype", "fp32", "--strategies", "ddp", "--json").stdout)
        optimizer_s = j["model"]["parameters"] * 32 / mem_bw
        for s in STRATEGIES:
            # Compute rate: two single-process runs side by side, as the two ranks will run, right
            # before them (the machine's load drifts over minutes).
            singles = [tmp / f"{name}_{s}_single{i}" for i in range(2)]
            run_all([train_cmd(d, model, seq, mb, steps) for d in singles])
            t1, achieved = [], []
            for d in singles:
                t, lines = step_times(d, mb * seq)
                t1 += t
                achieved += [l["mfu"] * 1e10 for l in lines[1:]]  # model FLOP/s (peak_flops 1e10)
            t1, achieved = statistics.median(t1), statistics.median(achieved)
            flops = achieved * t1 / max(t1 - optimizer_s, t1 / 2)  # the forward+backward's rate
            out = tmp / f"{name}_{s}"
            run_all([train_cmd(out, model, seq, mb, steps, 2, s)])
            t, lines = step_times(out, 2 * mb * seq)
            measured = statistics.median(t)
            exposed = statistics.median(l["comm_exposed_s"] for l in lines[1:])
            pj = json.loads(ftune(
                "plan", "--model", model.removeprefix("preset:"), "--gpus", "2", "--dtype", "fp32",
                "--micro-batch", str(mb), "--seq-len", str(seq), "--strategies", s,
                "--measured-flops", repr(flops), "--interconnect-bw", repr(link["bw_bytes_per_s"]),
                "--latency", repr(link["alpha_s"]), "--mem-bw", repr(mem_bw),
                "--gather-bw", repr(link["gather_bw_bytes_per_s"]), "--overlap", "0",
                "--layer-overhead", "0", "--json").stdout)["rows"][0]
            rows.append({"shape": name, "strategy": s, "measured_step_s": measured,
                         "measured_exposed_s": exposed, "projected_step_s": pj["step_s"],
                         "projected_exposed_s": pj["comm_exposed_s"],
                         "error": pj["step_s"] / measured - 1, "single_step_s": t1,
                         "flops": flops, "link": {k: link[k] for k in ("alpha_s", "bw_bytes_per_s",
                                                                       "gather_bw_bytes_per_s")},
                         "mem_bw": mem_bw})
    return rows


def print_table(rows):
    print(f"{'shape':6} {'strategy':8} {'single s':>9} {'measured s':>11} {'projected s':>12} "
          f"{'error':>7} {'exp. meas':>10} {'exp. proj':>10}")
    for r in rows:
        print(f"{r['shape']:6} {r['strategy']:8} {r['single_step_s']:9.4f} {r['measured_step_s']:11.4f} "
              f"{r['projected_step_s']:12.4f} {100 * r['error']:6.1f}% "
              f"{r['measured_exposed_s']:10.4f} {r['projected_exposed_s']:10.4f}")
    r = rows[0]
    print(f"link: alpha {r['link']['alpha_s'] * 1e6:.1f} us, all-reduce "
          f"{r['link']['bw_bytes_per_s'] / 1e9:.2f} GB/s, gathers "
          f"{r['link']['gather_bw_bytes_per_s'] / 1e9:.2f} GB/s; memory {r['mem_bw'] / 1e9:.2f} GB/s;"
          f" compute (GFLOP/s): " + ", ".join(f"{x['flops'] / 1e9:.1f}" for x in rows))


def test_measured_two_rank_step_times_within_25_percent(tmp_path):
    rows = validate(tmp_path)
    print_table(rows)
    bad = [r for r in rows if abs(r["error"]) > TOLERANCE]
    assert not bad, "projection off by more than 25%: " + ", ".join(
        f"{r['shape']}/{r['strategy']} {100 * r['error']:+.0f}%" for r in bad)


if __name__ == "__main__":
    rows = validate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/ftune_plan_validate"))
    print_table(rows)
    print(json.dumps(rows))
