"""`ftune train` against independent oracles, on the tiny preset and the bundled sample data.

- Parity: 20 steps of full fine-tuning equal a plain PyTorch/transformers loop (torch.optim.AdamW
  fused=True like ftune's default training.adam_fused, transformers' warmup schedules,
  clip_grad_norm_) fed the same batches that
  ftune dumped, within 1e-4 relative per step; the final weights agree too and load in transformers.
- Gradient accumulation 4 x micro-batch 1 equals micro-batch 4, with uneven target counts.
- Resume is bit-exact, and a kill -9 during a checkpoint write leaves the previous one loadable.
- Bad input is one clear stderr line naming file/line/key, with a non-zero exit.
"""
import json
import math
import os
import pty
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune_testing import SOURCE_DIR, ftune, ftune_bin

CONFIG = SOURCE_DIR / "configs" / "tiny_full.yaml"
# Small rows and no validation file unless a test needs them: each run takes a few seconds.
FAST = ["logging.peak_flops=1e10", "training.threads=2", "data.seq_len=128", "data.valid=",
        "training.resume=none"]


def train(out: Path, *sets, check=True, env=None, resume="none"):
    args = ["train", "--config", CONFIG, "--set", f"training.output_dir={out}"]
    for s in [*FAST[:-1], f"training.resume={resume}", *sets]:
        args += ["--set", s]
    return ftune(*args, check=check, cwd=SOURCE_DIR, env=env, timeout=300)


def metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --- parity with a plain PyTorch/transformers loop --------------------------------------------

def reference_run(base: Path, batch_dir: Path, steps: int, *, lr, schedule, warmup, wd,
                  max_norm, betas=(0.9, 0.999), eps=1e-8):
    """Replays ftune's dumped batches through transformers with a hand-written plain loop."""
    import transformers
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32,
                                             attn_implementation="sdpa")
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps, fused=True)
    make = {
        "cosine": lambda: transformers.get_cosine_schedule_with_warmup(opt, warmup, steps),
        "linear": lambda: transformers.get_linear_schedule_with_warmup(opt, warmup, steps),
        "constant": lambda: transformers.get_constant_schedule_with_warmup(opt, warmup),
    }
    sched = make[schedule]()
    out = []
    for step in range(1, steps + 1):
        t = load_file(batch_dir / f"step-{step}.safetensors")
        n_micro = len([k for k in t if k.endswith(".input_ids")])
        micro = [{k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(f"mb{i}.")}
                 for i in range(n_micro)]
        # The loss is normalized by the target tokens of the whole accumulated batch.
        total = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        lr_now = sched.get_last_lr()[0]
        loss_sum = 0.0
        for m in micro:
            logits = model(input_ids=m["input_ids"], position_ids=m["positions"],
                           attention_mask=m["attn_mask"].bool()).logits
            V = logits.shape[-1]
            ls = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, V), m["labels"][:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum")
            (ls / float(max(total, 1))).backward()
            loss_sum += ls.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                              max_norm if max_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out.append({"step": step, "loss": loss_sum / max(total, 1), "lr": lr_now,
                    "grad_norm": norm.item(), "targets": total})
    return model, out


@pytest.mark.parametrize("schedule,accum,packing", [("cosine", 2, "true"),
                                                     ("linear", 1, "false")])
def test_matches_plain_pytorch_loop(tmp_path, schedule, accum, packing):
    steps, lr, warmup, wd, max_norm = 20, 3e-3, 4, 0.1, 0.5
    out = tmp_path / "run"
    train(out, f"training.steps={steps}", f"training.lr_schedule={schedule}",
          f"training.grad_accum={accum}", "training.micro_batch=2", f"data.packing={packing}",
          # Padded rows hold one example each: long enough for prompt and response.
          f"data.seq_len={128 if packing == 'true' else 256}",
          f"training.lr={lr}", f"training.warmup_steps={warmup}", f"training.weight_decay={wd}",
          f"training.max_grad_norm={max_norm}", "training.dump_batches=true",
          "logging.log_every=1")
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    model, ref = reference_run(out / "base", out / "batches", steps, lr=lr, schedule=schedule,
                               warmup=warmup, wd=wd, max_norm=max_norm)
    clipped = 0
    for g, r in zip(got, ref):
        assert g["target_tokens"] == r["targets"]
        assert rel(g["lr"], r["lr"]) < 1e-12 or (g["lr"] == 0 and r["lr"] == 0), (g, r)
        assert rel(g["loss"], r["loss"]) < 1e-4, (g, r)
        assert rel(g["grad_norm"], r["grad_norm"]) < 1e-4, (g, r)
        clipped += r["grad_norm"] > max_norm
    assert clipped >= 3, "clipping should be active in this test"
    assert got[-1]["loss"] < got[0]["loss"] - 0.5, "the model should learn"

    # The final model is an HF model dir: transformers loads it, and its weights are the
    # reference loop's.
    from transformers import AutoTokenizer, LlamaForCausalLM

    final = LlamaForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    ref_sd = model.state_dict()
    for name, p in final.state_dict().items():
        d = (p - ref_sd[name]).norm() / ref_sd[name].norm().clamp_min(1e-12)
        assert d < 1e-4, name
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok("hello")["input_ids"]
    summary = (out / "config.yaml").read_text()
    assert f"lr_schedule: {schedule}" in summary


# --- gradient accumulation ---------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["false", "true"])
def test_grad_accum_equals_bigger_batch(tmp_path, packing):
    common = ["training.steps=6", f"data.packing={packing}",
              f"data.seq_len={128 if packing == 'true' else 256}",
              "logging.log_every=1", "training.max_grad_norm=0.5", "training.dump_batches=true"]
    train(tmp_path / "big", "training.micro_batch=4", "training.grad_accum=1", *common)
    train(tmp_path / "acc", "training.micro_batch=1", "training.grad_accum=4", *common)
    big, acc = metrics(tmp_path / "big"), metrics(tmp_path / "acc")
    for b, a in zip(big, acc):
        assert b["target_tokens"] == a["target_tokens"]
        assert rel(a["loss"], b["loss"]) < 2e-6, (a, b)
        assert rel(a["grad_norm"], b["grad_norm"]) < 1e-5, (a, b)
    # The four micro-batches of a step really carry different numbers of targets.
    t = load_file(tmp_path / "acc" / "batches" / "step-1.safetensors")
    counts = {int((t[f"mb{i}.labels"][:, 1:] != -100).sum()) for i in range(4)}
    assert len(counts) > 1, counts
    wa = load_file(tmp_path / "acc" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "big" / "final" / "model.safetensors")
    for k in wb:
        assert ((wa[k] - wb[k]).norm() / wb[k].norm()) < 1e-4, k


# --- resume and crash safety -------------------------------------------------------------------

RESUME_SETS = ["training.steps=10", "training.micro_batch=2", "training.eval_every=5",
               "data.valid_fraction=0.05", "logging.log_every=1", "training.keep_last=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(out, *RESUME_SETS)
    return out


def assert_same_run(a: Path, b: Path, first_step=1):
    ma, mb = metrics(a)[first_step - 1:], metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(first_step, 11))
    for x, y in zip(ma, mb):
        for key in ("loss", "lr", "grad_norm", "target_tokens"):
            assert x[key] == y[key], (key, x, y)  # bit for bit
        assert x.get("eval_loss") == y.get("eval_loss")
    wa = load_file(a / "final" / "model.safetensors")
    wb = load_file(b / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    p = train(out, *RESUME_SETS, "training.stop_after=5")
    assert "stopped: 5/10 steps" in p.stdout
    assert not (out / "final").exists()
    assert (out / "checkpoints" / "step-5" / "trainer_state.json").exists()
    p = train(out, *RESUME_SETS, resume="auto")
    assert "resuming from" in p.stderr and "step-5" in p.stderr
    assert_same_run(uninterrupted, out)
    # An explicit checkpoint path works the same way.
    out2 = tmp_path / "run2"
    train(out2, *RESUME_SETS, f"training.resume={out / 'checkpoints' / 'step-5'}")
    assert_same_run(uninterrupted, out2, first_step=6)  # a new output_dir: metrics from step 6


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, uninterrupted):
    out = tmp_path / "run"
    train(out, *RESUME_SETS, "training.save_every=2", "training.stop_after=4")
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4"]
    before = {p.name: p.read_bytes() for p in (ck / "step-4").iterdir()}

    env = dict(os.environ, FTUNE_TEST_SLOW_CHECKPOINT_WRITE="60")
    args = [ftune_bin(), "train", "--config", CONFIG, "--set", f"training.output_dir={out}"]
    for s in [*FAST[:-1], "training.resume=auto", *RESUME_SETS, "training.save_every=2"]:
        args += ["--set", s]
    proc = subprocess.Popen([str(a) for a in args], cwd=SOURCE_DIR, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        tmp_dirs = []
        while time.time() < deadline:  # wait until step 6's checkpoint is half written
            tmp_dirs = [p for p in ck.glob(".tmp-step-6-*") if (p / "optimizer.safetensors").exists()]
            if tmp_dirs:
                break
            assert proc.poll() is None, "ftune exited before the checkpoint write"
            time.sleep(0.05)
        assert tmp_dirs, "never saw the checkpoint being written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (ck / "step-6").exists()
    assert {p.name: p.read_bytes() for p in (ck / "step-4").iterdir()} == before
    # The surviving checkpoint is a loadable HF model dir...
    from transformers import LlamaForCausalLM
    LlamaForCausalLM.from_pretrained(ck / "step-4")
    # ...and resume auto picks it (not the half-written one) and finishes the run exactly.
    p = train(out, *RESUME_SETS, "training.save_every=2", resume="auto")
    assert "step-4" in p.stderr
    assert not list(ck.glob(".tmp-*"))
    assert sorted(q.name for q in ck.iterdir()) == ["step-10", "step-8"]  # keep_last=2
    assert_same_run(uninterrupted, out)


# --- bf16 autocast, progress display -------------------------------------------------------------

def test_bf16_autocast_close_to_fp32(tmp_path):
    sets = ["training.steps=5", "training.micro_batch=4", "logging.log_every=1"]
    train(tmp_path / "fp32", *sets)
    train(tmp_path / "bf16", *sets, "model.dtype=bf16")
    a, b = metrics(tmp_path / "fp32"), metrics(tmp_path / "bf16")
    assert any(x["loss"] != y["loss"] for x, y in zip(a, b)), "autocast changed nothing"
    for x, y in zip(a, b):
        assert rel(y["loss"], x["loss"]) < 2e-2, (x, y)
    w = load_file(tmp_path / "bf16" / "final" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in w.values())  # fp32 master weights


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grad_checkpointing_trains_identically(tmp_path, dtype):
    # Recomputation in backward must run under the forward's autocast state, so checkpointed
    # training equals plain training bit for bit (same ops, same dtypes, same order).
    sets = ["training.steps=4", "training.micro_batch=4", "logging.log_every=1", f"model.dtype={dtype}"]
    train(tmp_path / "plain", *sets)
    train(tmp_path / "ckpt", *sets, "model.grad_checkpointing=true")
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    assert [x["loss"] for x in a] == [y["loss"] for y in b]
    assert [x["grad_norm"] for x in a] == [y["grad_norm"] for y in b]


def test_progress_bar_on_terminal_and_lines_otherwise(tmp_path):
    sets = ["training.steps=3", "training.micro_batch=1"]
    p = train(tmp_path / "lines", *sets, "logging.log_every=1")
    assert "step 3/3 loss" in p.stderr and "\r" not in p.stderr
    master, slave = pty.openpty()
    args = [ftune_bin(), "train", "--config", CONFIG, "--set", f"training.output_dir={tmp_path / 'bar'}"]
    for s in [*FAST, *sets]:
        args += ["--set", s]
    proc = subprocess.run([str(a) for a in args], cwd=SOURCE_DIR, stdout=subprocess.PIPE,
                          stderr=slave, timeout=300)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert proc.returncode == 0
    text = data.decode(errors="replace")
    assert "\r" in text and "ETA" in text and "[" in text, text
    assert b"done: 3/3 steps" in proc.stdout


# --- bad input -----------------------------------------------------------------------------------

def one_error_line(p):
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ftune: error: "), lines[0]
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_inputs_give_one_clear_line(tmp_path):
    good = CONFIG.read_text()
    out = f"training.output_dir={tmp_path / 'out'}"

    def run_cfg(text, *sets):
        cfg = write(tmp_path / "cfg.yaml", text)
        args = ["train", "--config", cfg, "--set", out]
        for s in sets:
            args += ["--set", s]
        return one_error_line(ftune(*args, check=False, cwd=SOURCE_DIR))

    line = run_cfg("model:\n  path: [preset:tiny\n")
    assert "cfg.yaml:" in line and "malformed YAML" in line

    bad = good.replace("  lr_schedule: cosine", "  lr_schedule: cosine\n  lr_shedule: linear")
    n = bad.splitlines().index("  lr_shedule: linear") + 1
    assert f"cfg.yaml:{n}: training.lr_shedule: unknown key" in run_cfg(bad)

    bad = re.sub(r"(?m)^  steps: \d+", "  steps: thirty", good)
    n = bad.splitlines().index("  steps: thirty") + 1
    assert f"cfg.yaml:{n}: training.steps: expected an integer, got \"thirty\"" in run_cfg(bad)

    line = one_error_line(ftune("train", "--config", tmp_path / "nope.yaml", check=False))
    assert "nope.yaml: cannot read: no such file" in line

    line = run_cfg(good, "data.train=missing.jsonl")
    assert "--set data.train=missing.jsonl: data.train: missing.jsonl: no such file" in line

    rows = [{"instruction": "a", "input": "", "output": "b"}] * 3
    bad_json = write(tmp_path / "bad.jsonl",
                     json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    line = run_cfg(good, f"data.train={bad_json}")
    assert f"{bad_json}:2:" in line, line

    no_field = write(tmp_path / "nofield.jsonl",
                     json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n"
                     + json.dumps({"instruction": "x", "input": ""}) + "\n")
    line = run_cfg(good, f"data.train={no_field}")
    assert f"{no_field}:3:" in line and "output" in line, line

    empty = write(tmp_path / "empty.jsonl", "")
    line = run_cfg(good, f"data.train={empty}")
    assert str(empty) in line and "empty" in line, line

    line = run_cfg(good, "data.seq_len=1024")
    assert "--set data.seq_len=1024: data.seq_len: 1024 exceeds max_position_embeddings 512" in line

    bad = re.sub(r"(?m)^  micro_batch: \d+", "  micro_batch: 0", good)
    n = bad.splitlines().index("  micro_batch: 0") + 1
    assert f"cfg.yaml:{n}: training.micro_batch: expected at least 1, got 0" in run_cfg(bad)

    line = run_cfg(good, "training.resume=/nonexistent/step-3")
    assert "training.resume: /nonexistent/step-3: not a complete checkpoint" in line
    line = run_cfg(good + "lora:\n  r: 8\n")
    assert "lora: section not supported yet" in line


def test_eval_at_start_and_loss_plot(tmp_path):
    import xml.etree.ElementTree as ET

    out = tmp_path / "run"
    train(out, "training.steps=6", "training.eval_every=3", "training.eval_at_start=true",
          "data.valid=data/sample_valid.jsonl",
          "logging.log_every=1")
    m = metrics(out)
    assert m[0]["step"] == 0 and "eval_loss" in m[0] and "loss" not in m[0]
    evals = [r["eval_loss"] for r in m if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    svg = ET.parse(out / "loss_curve.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2  # train loss and eval loss
    assert len(lines[0].get("points").split()) == 6
