"""`ftune train` against independent oracles, on the tiny preset and the bundled sample data.

- Parity: 20 steps of full fine-tuning equal a plain PyTorch/transformers loop (torch.optim.AdamW
  fused=True like ftune's default training.adam_fused, transformers' warmup schedules,
  clip_grad_norm_) fed the same batches that ftune dumped. Measured (CPU, fp32, torch 2.11): per
  step loss and grad norm within 1.9e-7 relative, final weights within 1.9e-7; bounds 1e-6.
- Gradient accumulation 4 x micro-batch 1 equals micro-batch 4, with uneven target counts
  (measured: loss, grad norm and weights within 1.3e-7; bounds 1e-6).
- Resume is bit-exact, also after a kill mid-checkpoint-write left a half-written dir.
- epochs gives the documented step count; MFU is model FLOPs over the peak; the resolved
  config.yaml is a valid input; checkpoints are model dirs for `ftune eval`; the summary never
  shows a stale eval loss.
Bad input, resume checks and AdamW alone: test_train_inputs.py (fast). This file takes several
minutes on two cores: ctest label `slow`.
"""
import json
import math
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune_testing import SOURCE_DIR, ftune, ftune_bin
from train_testing import CONFIG, FAST, metrics, rel, replay_step, train

# --- parity with a plain PyTorch/transformers loop --------------------------------------------

def reference_run(base: Path, batch_dir: Path, steps: int, *, lr, schedule, warmup, wd,
                  max_norm, betas=(0.9, 0.999), eps=1e-8, device="cpu", autocast=False):
    """Replays ftune's dumped batches through transformers with a hand-written plain loop, on
    `device` (fp32 weights; `autocast`: bf16 autocast forward, as ftune's model.dtype bf16)."""
    import transformers
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32,
                                             attn_implementation="sdpa").to(device)
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
        lr_now = sched.get_last_lr()[0]
        loss, total = replay_step(model, batch_dir, step, device, autocast)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                              max_norm if max_norm > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out.append({"step": step, "loss": loss, "lr": lr_now, "grad_norm": norm.item(),
                    "targets": total})
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
        assert rel(g["loss"], r["loss"]) < 1e-6, (g, r)
        assert rel(g["grad_norm"], r["grad_norm"]) < 1e-6, (g, r)
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
        assert d < 1e-6, (name, d)
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
        assert rel(a["loss"], b["loss"]) < 1e-6, (a, b)
        assert rel(a["grad_norm"], b["grad_norm"]) < 1e-6, (a, b)
    # The four micro-batches of a step really carry different numbers of targets.
    t = load_file(tmp_path / "acc" / "batches" / "step-1.safetensors")
    counts = {int((t[f"mb{i}.labels"][:, 1:] != -100).sum()) for i in range(4)}
    assert len(counts) > 1, counts
    wa = load_file(tmp_path / "acc" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "big" / "final" / "model.safetensors")
    for k in wb:
        assert ((wa[k] - wb[k]).norm() / wb[k].norm()) < 1e-6, k


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


def test_resume_after_a_kill_mid_checkpoint_write(tmp_path, uninterrupted):
    # A kill in the middle of a checkpoint write (tests/train/checkpoint_test.cpp kills a real
    # writer at that point) leaves a temp dir with the weights but no trainer_state.json. Resume
    # must ignore it, remove it, continue from the previous checkpoint and finish exactly.
    out = tmp_path / "run"
    train(out, *RESUME_SETS, "training.save_every=2", "training.stop_after=4")
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4"]
    half = ck / ".tmp-step-6-99999"
    half.mkdir()
    for name in ("model.safetensors", "config.json", "optimizer.safetensors"):
        (half / name).write_bytes(b"\0" * 64)  # garbage: must never be read
    # The surviving checkpoint is a loadable HF model dir, tokenizer included...
    from transformers import AutoTokenizer, LlamaForCausalLM
    LlamaForCausalLM.from_pretrained(ck / "step-4")
    assert AutoTokenizer.from_pretrained(ck / "step-4")("hello")["input_ids"]
    # ...and resume auto picks it (not the half-written one) and finishes the run exactly.
    p = train(out, *RESUME_SETS, "training.save_every=2", resume="auto")
    assert "resuming from" in p.stderr and "step-4" in p.stderr
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


# --- evaluation --------------------------------------------------------------------------------

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



# --- epochs, MFU -------------------------------------------------------------------------------

def test_epochs_give_the_documented_number_of_steps(tmp_path):
    # Padding mode: one example per row, so an epoch is the file's line count.
    rows = len((SOURCE_DIR / "data" / "sample_train.jsonl").read_text().splitlines())
    out = tmp_path / "run"
    p = train(out, "training.steps=0", "training.epochs=0.15", "training.micro_batch=4",
              "training.grad_accum=2", "data.packing=false", "data.seq_len=256",
              "logging.log_every=1")
    steps = math.ceil(0.15 * rows / (4 * 2))
    assert f"done: {steps}/{steps} steps" in p.stdout
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    assert f"{rows} rows per epoch" in p.stderr
    assert "\n  steps:" not in (out / "config.yaml").read_text()


def test_mfu_is_model_flops_over_peak(tmp_path):
    out = tmp_path / "run"
    seq = 128
    train(out, "training.steps=3", "training.micro_batch=2", "logging.log_every=1")
    cfg = json.loads((out / "base" / "config.json").read_text())
    w = load_file(out / "final" / "model.safetensors")
    n_params = sum(t.numel() for t in w.values())
    if not cfg.get("tie_word_embeddings"):
        n_params -= w["model.embed_tokens.weight"].numel()  # a lookup, not a matmul
    fpt = 6 * n_params + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq
    for r in metrics(out):
        assert r["mfu"] > 0
        assert rel(r["mfu"], fpt * r["tokens_per_s"] / 1e10) < 1e-12, r  # FAST sets peak 1e10
    # Without logging.peak_flops the peak is a measured matmul rate, printed at start-up.
    p = train(tmp_path / "measured", "training.steps=2", "logging.log_every=1",
              "logging.peak_flops=0")
    peak = float(re.search(r"peak (\S+) FLOP/s \(measured matmul\)", p.stderr).group(1))
    assert peak > 1e8
    for r in metrics(tmp_path / "measured"):
        assert rel(r["mfu"], fpt * r["tokens_per_s"] / peak) < 1e-2, r  # peak printed with %.3g


# --- resolved config, checkpoints as models ---------------------------------------------------

def test_resolved_config_is_a_valid_input(tmp_path):
    a = tmp_path / "a"
    train(a, "training.steps=3", "training.micro_batch=2", "logging.log_every=1")
    b = tmp_path / "b"
    ftune("train", "--config", a / "config.yaml", "--set", f"training.output_dir={b}",
          cwd=SOURCE_DIR, timeout=300)
    ya, yb = (a / "config.yaml").read_text(), (b / "config.yaml").read_text()
    assert ya.replace(str(a), str(b)) == yb
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]  # the same run


def test_checkpoint_dir_is_a_model_for_eval(tmp_path):
    out = tmp_path / "run"
    train(out, "training.steps=4", "training.save_every=4", "training.micro_batch=2")
    ck = out / "checkpoints" / "step-4"
    text = SOURCE_DIR / "data" / "sample_text.jsonl"  # any UTF-8 text
    got = json.loads(ftune("eval", "--model", ck, "--text", text, "--seq-len", "128",
                           "--json").stdout)
    ref = json.loads(ftune("eval", "--model", out / "final", "--text", text, "--seq-len", "128",
                           "--json").stdout)
    assert got == ref  # step 4 is the last step: the same weights as final/
    assert (ck / "tokenizer.json").read_bytes() == (out / "final" / "tokenizer.json").read_bytes()


# --- the summary after stop_after --------------------------------------------------------------

def test_summary_never_shows_a_stale_eval_loss(tmp_path):
    out = tmp_path / "run"
    sets = ["training.steps=8", "training.eval_every=4", "data.valid=data/sample_valid.jsonl",
            "logging.log_every=1"]
    p = train(out, *sets, "training.stop_after=6")
    evals = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r}
    assert list(evals) == [4]
    assert f"last eval loss {evals[4]:.4f} (ppl {math.exp(evals[4]):.3f}, at step 4)" in p.stdout
    p = train(out, *sets, resume="auto")
    evals = {r["step"]: r["eval_loss"] for r in metrics(out) if "eval_loss" in r}
    assert f", eval loss {evals[8]:.4f} (ppl" in p.stdout and "at step" not in p.stdout
