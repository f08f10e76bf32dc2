"""Checkpoint checksums and damaged checkpoints (issue #12 item 3; docs/training.md "Checkpoints
and resume"). Every checkpoint carries checksums.json: each other file's size and CRC-32C, checked
here against a CRC-32C computed in Python. A run stopped at step 6 (checkpoints 2, 4, 6) has its
newest checkpoint damaged (a flipped byte in the weights, a truncated optimizer file, a deleted
trainer_state.json); `training.resume: auto` then names it on one warning line, resumes from step
4, and ends with the uninterrupted run's losses and final weights, bit for bit. Also under 2 zero1
ranks with rank 1's shard damaged (rank 0 verifies, both ranks agree on step 4). An explicit
`training.resume: PATH` of a damaged checkpoint is one error line naming the file; when every
checkpoint is damaged the run fails (no fresh start over them); a checkpoint from before checksums
loads with a warning. Tiny preset, 8 steps, about 30 s on two cores."""
import json
import shutil

import pytest
from safetensors.torch import load_file

from ddp_util import ddp_train, single_train, tiny_model, weight_file
from train_testing import crc32c, metrics

SETS = ["training.steps=8", "training.grad_accum=2", "training.micro_batch=2",
        "training.save_every=2", "training.keep_last=3", "training.resume=auto"]


def test_crc32c_oracle():
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(model, uninterrupted run, the same stopped after step 6) in one process."""
    model = tiny_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("runs")
    sets = [*SETS, f"model.path={model}"]
    single_train(root / "whole", *sets)
    single_train(root / "stopped", *sets, "training.stop_after=6")
    return model, root / "whole", root / "stopped"


def train(out, model, *sets, world=1):
    if world == 1:
        return single_train(out, *SETS, f"model.path={model}", *sets, check=False)
    res = ddp_train(out, world, *SETS, f"model.path={model}", *sets, check=False)
    return res[0]


def assert_same_run(out, whole):
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(whole)]
    a, b = load_file(weight_file(out / "final")), load_file(weight_file(whole / "final"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def flip(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_checksums_list_every_file(runs):
    _, _, stopped = runs
    ck = stopped / "checkpoints" / "step-6"
    listed = json.loads((ck / "checksums.json").read_text())
    assert listed["algorithm"] == "crc32c"
    files = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()}
    assert set(listed["files"]) == files - {"checksums.json"}
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= files
    for name, e in listed["files"].items():
        data = (ck / name).read_bytes()
        assert e == {"size": len(data), "crc32c": f"{crc32c(data):08x}"}, name


# What is damaged in step-6, and what the warning says about it.
DAMAGE = {
    "flip": ("model.safetensors", flip, "expected CRC-32C"),
    "truncate": ("optimizer.safetensors",
                 lambda p: p.write_bytes(p.read_bytes()[:-1000]), "bytes (checksums.json)"),
    "delete": ("trainer_state.json", lambda p: p.unlink(), "missing (checksums.json lists it)"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_auto_skips_a_damaged_newest_checkpoint(runs, tmp_path, kind):
    model, whole, stopped = runs
    out = shutil.copytree(stopped, tmp_path / "run")
    name, damage, says = DAMAGE[kind]
    damage(out / "checkpoints" / "step-6" / name)
    p = train(out, model)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [l for l in p.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 1, p.stderr[-3000:]
    assert warnings[0].startswith(f"resume: warning: skipping the damaged checkpoint {out}/"
                                  f"checkpoints/step-6: {name}: "), warnings[0]
    assert says in warnings[0], warnings[0]
    assert f"resuming from {out}/checkpoints/step-4 (step 4)" in p.stderr
    assert_same_run(out, whole)


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(runs, tmp_path):
    model, _, stopped = runs
    out = shutil.copytree(stopped, tmp_path / "run")
    ck = out / "checkpoints" / "step-6"
    flip(ck / "rng.safetensors", offset=-1)
    p = train(out, model, f"training.resume={ck}")
    errors = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1 and len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith(f"ftune: error: --set training.resume={ck}: training.resume: "
                                f"checkpoint {ck}: rng.safetensors: expected CRC-32C "), errors[0]


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(runs, tmp_path):
    model, _, stopped = runs
    out = shutil.copytree(stopped, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    for step in (2, 4, 6):
        (out / "checkpoints" / f"step-{step}" / "optimizer.safetensors").unlink()
    p = train(out, model)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1 and len(lines) == 4, p.stderr[-3000:]
    assert all("resume: warning: skipping the damaged checkpoint" in l for l in lines[:3])
    assert lines[3].endswith(f"training.resume: auto: none of the 3 checkpoints in "
                             f"{out}/checkpoints is complete (each is named above); fix or remove "
                             "them, or start fresh with training.resume: none or a new "
                             "training.output_dir"), lines[3]
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-2", "step-4",
                                                                       "step-6"]


def test_checkpoint_from_before_checksums_loads_with_a_warning(runs, tmp_path):
    model, whole, stopped = runs
    out = shutil.copytree(stopped, tmp_path / "run")
    ck = out / "checkpoints" / "step-6"
    (ck / "checksums.json").unlink()
    state = json.loads((ck / "trainer_state.json").read_text())
    state["format_version"] = 1
    (ck / "trainer_state.json").write_text(json.dumps(state, indent=2))
    p = train(out, model)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (f"resume: warning: {ck} has no checksums.json (written by an older ftune): loading "
            "it unverified") in p.stderr.splitlines()
    assert f"resuming from {ck} (step 6)" in p.stderr
    assert_same_run(out, whole)


def test_sharded_ranks_agree_to_skip_a_damaged_shard(runs, tmp_path):
    """zero1 at 2 ranks: checksums.json covers every rank's shard and the index; rank 1's shard of
    step 6 flipped; rank 0 finds it, both ranks resume from step 4."""
    model, _, _ = runs
    zero = ["parallel.strategy=zero1", "training.micro_batch=1", "parallel.timeout_s=60"]
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert train(whole, model, *zero, world=2).rc == 0
    assert train(out, model, *zero, "training.stop_after=6", world=2).rc == 0
    ck = out / "checkpoints" / "step-6"
    listed = json.loads((ck / "checksums.json").read_text())["files"]
    assert {"shards/index.json", "shards/rank-0-of-2.safetensors",
            "shards/rank-1-of-2.safetensors"} <= set(listed)
    flip(ck / "shards" / "rank-1-of-2.safetensors")
    r0 = train(out, model, *zero, world=2)
    assert r0.rc == 0, r0.stderr[-3000:]
    assert (f"resume: warning: skipping the damaged checkpoint {ck}: shards/rank-1-of-2.safetensors"
            ": expected CRC-32C") in r0.stderr
    assert f"resuming from {out}/checkpoints/step-4 (step 4)" in r0.stderr
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(whole)]
    a, b = load_file(weight_file(out / "final")), load_file(weight_file(whole / "final"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
