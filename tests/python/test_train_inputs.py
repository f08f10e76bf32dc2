"""`ftune train` on input it must refuse or flag, and AdamW against torch; each case runs at
most a few steps of the tiny preset, so this file stays in the default `make test`.

- Bad config, paths, data: one clear stderr line naming file/line/key, exit code 1.
- Resume refuses a changed config (naming the keys, old -> new), fewer steps than the checkpoint
  has done, and a corrupt trainer_state.json (naming the file and field); raised steps and
  training.resume: force continue.
- Data without target tokens is counted and reported, and an error when none is left; NaN weights
  fail at step 1.
- AdamW alone equals torch.optim.AdamW bit for bit (unfused vs foreach=False, fused vs fused=True).
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune_testing import SOURCE_DIR, ftune, run, tool
from train_testing import (CONFIG, copy_run, edit_checkpoint_file, metrics, one_error_line, rel,
                           train, write)

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
    line = run_cfg(good + "parallel:\n  dp: 2\n")
    assert "parallel.dp: unknown key" in line
    line = run_cfg(good + "parallel:\n  strategy: fsdp4\n")
    assert "parallel.strategy" in line and "fsdp4" in line

    bad = good.replace("  lr_schedule: cosine", "  lr_schedule: cosine\n  lr: 1.0")
    first = good.splitlines().index("  lr: 3.0e-3                 # a tiny, freshly initialized "
                                    "model takes a large lr") + 1
    n = bad.splitlines().index("  lr: 1.0") + 1
    assert f"cfg.yaml:{n}: training.lr: duplicate key (first at line {first})" in run_cfg(bad)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_torch(tmp_path, fused):
    """ftune's AdamW on the same parameters and gradients as torch.optim.AdamW: the unfused one
    against foreach=False (bit for bit, as docs/training.md says), the fused one against
    fused=True."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"w": (7, 5), "b": (5,), "emb": (11, 3)}
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    lrs = [0.0, 1e-2, 3e-3, 5e-2, 1e-3, 2e-2]
    grads = [{k: torch.randn(s, generator=g) * 10 ** (i % 3 - 1) for k, s in shapes.items()}
             for i in range(len(lrs))]
    hp = dict(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    tensors = {f"param.{k}": v for k, v in params.items()}
    for i, gr in enumerate(grads):
        tensors.update({f"grad.{i}.{k}": v for k, v in gr.items()})
    meta = {k: repr(v) for k, v in hp.items()}
    meta.update(lrs=",".join(repr(x) for x in lrs), fused="1" if fused else "0")
    save_file(tensors, tmp_path / "in.safetensors", metadata=meta)
    run([tool("adamw_tool"), tmp_path / "in.safetensors", tmp_path / "out.safetensors"])
    got = load_file(tmp_path / "out.safetensors")

    ps = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    decay = [ps[k] for k in ps if ps[k].dim() >= 2]
    no_decay = [ps[k] for k in ps if ps[k].dim() < 2]
    kind = {"fused": True} if fused else {"foreach": False}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lrs[0], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], **kind)
    for lr, gr in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in ps.items():
            p.grad = gr[k].clone()
        opt.step()
    for k, p in ps.items():
        st = opt.state[p]
        for mine, theirs in ((got[f"param.{k}"], p.detach()), (got[f"{k}.exp_avg"], st["exp_avg"]),
                             (got[f"{k}.exp_avg_sq"], st["exp_avg_sq"])):
            # Measured: both agree bit for bit with torch 2.11 on CPU.
            assert torch.equal(mine, theirs), (k, (mine - theirs).abs().max())
        assert int(got[f"{k}.step"]) == int(st["step"]) == len(lrs)


SHORT = ["training.steps=6", "training.micro_batch=2", "logging.log_every=1"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 6 steps stopped after 3 (a checkpoint at step 3); copied per test."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(out, *SHORT, "training.stop_after=3")
    return out


def test_resume_with_a_changed_config_is_an_error(tmp_path, stopped_run):
    out = copy_run(stopped_run, tmp_path / "run")
    config_before = (out / "config.yaml").read_text()
    p = train(out, *SHORT, "training.lr=1e-3", "data.seq_len=64", check=False, resume="auto")
    line = one_error_line(p)
    assert p.returncode == 1
    # Named at the first changed key (in key order), with every change listed.
    assert line.startswith("ftune: error: --set data.seq_len=64: data.seq_len: the config "
                           "differs from the one of checkpoint "), line
    assert "training.lr 0.003 -> 0.001" in line and "data.seq_len 128 -> 64" in line, line
    assert "training.resume: none" in line and "training.resume: force" in line, line
    assert str(out / "checkpoints" / "step-3") in line
    # Nothing of the old run was touched.
    assert (out / "config.yaml").read_text() == config_before
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]

    # Fewer steps than the checkpoint has done: an error, not "done: 3/2 steps".
    p = train(out, *SHORT, "training.steps=2", check=False, resume="auto")
    line = one_error_line(p)
    assert "--set training.steps=2: training.steps: the run would end at step 2, before the " \
           "step 3 of the checkpoint" in line, line


def test_resume_with_raised_steps_or_force_continues(tmp_path, stopped_run):
    out = copy_run(stopped_run, tmp_path / "raised")
    p = train(out, *SHORT, "training.steps=8", "logging.log_every=2", resume="auto")
    assert "resuming from" in p.stderr
    note = [l for l in p.stderr.splitlines() if "changes that keep the run the same" in l]
    assert len(note) == 1, p.stderr
    assert "logging.log_every 1 -> 2" in note[0] and "training.steps 6 -> 8" in note[0], note
    assert "training.output_dir" in note[0] and "stop_after" not in note[0], note  # a copied run
    assert "done: 8/8 steps" in p.stdout
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 6, 8]

    out = copy_run(stopped_run, tmp_path / "forced")
    p = train(out, *SHORT, "training.lr=1e-3", resume="force")
    assert "resuming from" in p.stderr and "step-3" in p.stderr
    assert "continuing despite training.lr 0.003 -> 0.001" in p.stderr
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 7))
    # Warmup 3 of 6 cosine steps: step 3 ran at 2/3 of the old peak, step 4 at the new peak.
    assert rel(m[2]["lr"], 2e-3) < 1e-12 and rel(m[3]["lr"], 1e-3) < 1e-12, m
    assert "lr: 0.001" in (out / "config.yaml").read_text()


def test_resume_rejects_a_corrupt_trainer_state(tmp_path, stopped_run):
    # Edited with checksums.json to match (damage is test_checkpoint_verify's): the values are
    # still checked. Resumed by path, so the error is the run's one line (auto would skip it).
    out = copy_run(stopped_run, tmp_path / "run")
    ck = out / "checkpoints" / "step-3"
    state_file = ck / "trainer_state.json"
    j = json.loads(state_file.read_text())
    for key, value, expect in [("step", -1, "state.step: expected an integer in [0, "),
                               ("step", 2 ** 50, "state.step: expected an integer in [0, "),
                               ("tokens_seen", -7, "state.tokens_seen: expected an integer"),
                               ("position", 10 ** 6, "state.position: 1000000 is beyond the")]:
        bad = json.loads(json.dumps(j))
        bad["state"][key] = value
        edit_checkpoint_file(ck, "trainer_state.json", json.dumps(bad))
        line = one_error_line(train(out, *SHORT, check=False, resume=ck))
        assert f"{state_file}: {expect}" in line, line
    edit_checkpoint_file(ck, "trainer_state.json",
                         json.dumps(j).replace('"elapsed_s": ', '"elapsed_s": -'))
    line = one_error_line(train(out, *SHORT, check=False, resume=ck))
    assert f"{state_file}: state.elapsed_s: expected a finite number >= 0" in line, line


def test_data_without_targets(tmp_path):
    # Byte-level tokens: the alpaca template alone is ~150, so "ok" needs seq_len 256.
    long_prompt = {"instruction": "x" * 400, "input": "", "output": "short"}
    ok = {"instruction": "hi", "input": "", "output": "a short answer"}
    path = write(tmp_path / "long.jsonl", "\n".join(json.dumps(long_prompt) for _ in range(5)))
    p = train(tmp_path / "a", "training.steps=2", f"data.train={path}", "data.packing=false",
              check=False)
    line = one_error_line(p)
    assert p.returncode == 1
    assert f"--set data.train={path}: data.train: no example gives a target token" in line, line
    assert "5 examples: 5 with every target beyond data.seq_len 128, 0 with no target" in line
    assert not (tmp_path / "a" / "metrics.jsonl").exists()

    # Empty texts: only the end-of-text token, nothing to predict.
    empty = write(tmp_path / "empty.jsonl", '{"text": ""}\n' * 4)
    line = one_error_line(train(tmp_path / "b", "training.steps=2", f"data.train={empty}",
                                "data.format=text", check=False))
    assert "no example gives a target token" in line and "4 with no target tokens at all" in line

    # Some left: one stderr line with the counts, then training.
    mixed = write(tmp_path / "mixed.jsonl",
                  "\n".join(json.dumps(r) for r in [long_prompt, ok, long_prompt, ok, ok]))
    p = train(tmp_path / "c", "training.steps=2", f"data.train={mixed}", "data.packing=false",
              "training.micro_batch=1", "data.seq_len=256")
    assert ("data.train: 2 of 5 examples give no target token and add no loss (2 with every "
            "target beyond data.seq_len 256, 0 with no target tokens at all (empty response or "
            "text)); 2 truncated to data.seq_len") in p.stderr, p.stderr


def test_nan_weights_fail_at_step_one(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good"
    train(good, "training.steps=1")
    model = tmp_path / "model"
    shutil.copytree(good / "final", model)
    w = load_file(model / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    p = train(tmp_path / "run", "training.steps=3", f"model.path={model}", check=False)
    # Found only once training has started (after its "training ..." line): the error ends it.
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("ftune: error: step 1: loss is ") and "nan: check the model weights (model.path)" in line, line


def test_output_dir_and_input_paths_that_cannot_work(tmp_path):
    a_file = write(tmp_path / "file.txt", "x")
    for out, expect in [(a_file, f"training.output_dir: {a_file}: exists and is not a directory"),
                        (a_file / "sub", f"training.output_dir: {a_file / 'sub'}: {a_file} is not "
                                         "a directory"),
                        ("/proc/ftune-run", "training.output_dir: /proc/ftune-run: cannot create")]:
        p = train(Path(out), "training.steps=1", check=False)
        line = one_error_line(p)
        assert p.returncode == 1
        assert f"--set training.output_dir={out}: {expect}" in line, line
    assert a_file.read_text() == "x"
    for key in ("data.train", "data.valid"):
        line = one_error_line(train(tmp_path / "o", "training.steps=1", f"{key}={tmp_path}",
                                    check=False))
        assert f"--set {key}={tmp_path}: {key}: {tmp_path}: is a directory, expected a JSONL " \
               "file" in line, line
    p = ftune("train", "--config", tmp_path, check=False)
    assert one_error_line(p) == f"ftune: error: {tmp_path}: --config: is a directory (expected " \
                                "a YAML config file)"
    assert p.returncode == 1
