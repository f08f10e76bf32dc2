"""Divergence (issue #12 item 2): a non-finite loss or gradient norm, fed through the test seam
FTUNE_TEST_NAN_AT="<rank>:<steps>" (that rank's loss, and so its gradients, NaN at those steps).

- training.nonfinite: stop (the default): one error line naming the step; the update is not
  applied; the last checkpoint stays the latest and resuming from it finishes the run with the
  uninterrupted losses, bit for bit.
- skip: the step's update is dropped (the checkpoints before and after it hold the same weights
  and AdamW state), it is logged ("skipped": true), training goes on; more than
  training.max_skipped in a row ends the run with an error.
- Under DDP a NaN on one rank is seen by all (the loss is summed over the ranks and the gradients
  all-reduced): both skip the same step and stay bit-identical replicas.
"""
from safetensors.torch import load_file

from ddp_util import clean_env, ddp_train, free_port, rank_env, single_train, train_args
from ftune_testing import SOURCE_DIR, ftune
from train_testing import metrics, one_error_line

SETS = ["training.steps=6", "training.grad_accum=2", "training.micro_batch=2",
        "training.max_grad_norm=0.5", "training.save_every=1", "training.keep_last=10"]


def nan_env(spec):
    return clean_env({"FTUNE_TEST_NAN_AT": spec})


def run(out, *sets, spec=None, check=True):
    """One process, the loss NaN at `spec`'s steps (None: no NaN)."""
    env = nan_env(spec) if spec else clean_env()
    return ftune(*train_args(out, *SETS, *sets)[1:], check=check, cwd=SOURCE_DIR, env=env,
                 timeout=180)


def error_line(p):
    """The run failed with exactly one error line (after its progress lines)."""
    assert p.returncode == 1, p.stderr[-2000:]
    lines = [l for l in p.stderr.splitlines() if l.startswith("ftune: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    return lines[0]


def same(a, b):
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def test_stop_keeps_the_last_checkpoint(tmp_path):
    whole = tmp_path / "whole"
    single_train(whole, *SETS)
    out = tmp_path / "run"
    p = run(out, spec="0:3", check=False)
    line = error_line(p)
    assert "step 3: the loss (nan) or the gradient norm" in line, line
    assert "training.nonfinite: stop" in line, line
    ckpts = sorted(d.name for d in (out / "checkpoints").iterdir())
    assert ckpts == ["step-1", "step-2"], ckpts
    # No NaN this time; switching to skip (as the error suggests) keeps the run the same.
    p = run(out, "training.resume=auto", "training.nonfinite=skip")
    assert 'training.nonfinite "stop" -> "skip"' in p.stderr, p.stderr[-2000:]
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(whole)]
    assert same(out / "final" / "model.safetensors", whole / "final" / "model.safetensors")


def test_skip_drops_the_update(tmp_path):
    out = tmp_path / "run"
    p = run(out, "training.nonfinite=skip", spec="0:3")
    assert "step 3: skipped: loss nan" in p.stderr, p.stderr[-2000:]
    m = {r["step"]: r for r in metrics(out)}
    assert m[3].get("skipped") is True and m[3]["loss"] is None
    assert all("skipped" not in m[s] and m[s]["loss"] > 0 for s in (1, 2, 4, 5, 6))
    c = out / "checkpoints"
    assert same(c / "step-2" / "model.safetensors", c / "step-3" / "model.safetensors")
    assert same(c / "step-2" / "optimizer.safetensors", c / "step-3" / "optimizer.safetensors")
    assert not same(c / "step-3" / "model.safetensors", c / "step-4" / "model.safetensors")


def test_too_many_skipped_in_a_row(tmp_path):
    p = run(tmp_path / "run", "training.nonfinite=skip", "training.max_skipped=1", spec="0:3,4",
            check=False)
    line = error_line(p)
    assert "step 4: 2 steps in a row had a non-finite loss" in line, line
    assert "training.max_skipped (1)" in line, line


def test_ddp_ranks_agree(tmp_path):
    """Rank 1 alone gets the NaN at step 3; both ranks skip it and end bit-identical."""
    out = tmp_path / "ddp"
    port = free_port()
    res = ddp_train(out, 2, *SETS, "training.nonfinite=skip", port=port,
                    env_of_rank=lambda r: rank_env(r, 2, port, FTUNE_TEST_NAN_AT="1:3"))
    assert "step 3: skipped" in res[0].stderr, res[0].stderr[-2000:]
    assert "bit-identical" in res[0].stdout + res[0].stderr
    m = {r["step"]: r for r in metrics(out)}
    assert m[3].get("skipped") is True
    c = out / "checkpoints"
    assert same(c / "step-2" / "model.safetensors", c / "step-3" / "model.safetensors")
    # Under stop, both ranks end with the error at the same step.
    out2 = tmp_path / "ddp-stop"
    port2 = free_port()
    res = ddp_train(out2, 2, *SETS, port=port2, check=False,
                    env_of_rank=lambda r: rank_env(r, 2, port2, FTUNE_TEST_NAN_AT="1:3"))
    for r in res:
        assert r.rc == 1 and any("step 3: the loss (nan)" in l for l in r.error_lines()), \
            r.stderr[-2000:]


def test_config_errors(tmp_path):
    for sets, expected in ((["training.nonfinite=maybe"], "training.nonfinite"),
                           (["training.max_skipped=0"], "training.max_skipped: expected at least 1")):
        p = run(tmp_path / "run", *sets, check=False)
        assert expected in one_error_line(p)
