"""Sharded checkpoints (docs/distributed.md "Checkpoints"): under zero1/zero2 every rank writes its
own pieces (checkpoints/step-N/shards/rank-<r>-of-<n>.safetensors + index.json), and loading
reshards. Ranks started with the launcher variables (ddp_util.py), the tiny preset, fp32, 16 steps,
grad_accum 2, clipping active; a run stopped at step 8 and resumed against the uninterrupted run.

- Same strategy and world size (zero1, zero2; full fine-tuning and LoRA): the resumed run's losses
  and final weights are bit-identical to the uninterrupted run's.
- Another world size (zero2 at 2 -> 3 ranks, same global batch of 12 rows), one process
  (parallel.strategy none) and DDP at 2 ranks: losses and final weights within 1e-5 relative;
  LoRA too (3 ranks, one process).
- An old consolidated checkpoint (one process, model.safetensors + optimizer.safetensors)
  resumes under zero2 at 2 ranks, read by flat range: within 1e-5.
- Rank 1 killed (-9) after writing its shard of step 8, before rank 0 completed the checkpoint:
  step-4 stays the latest, the temp dir is cleaned at the next start, and the run resumed from
  step 4 ends bit-identical to the uninterrupted one.
- `ftune generate --model` on a sharded checkpoint: one error line pointing at final/.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ddp_util import (ddp_train, free_port, max_rel, rank_env, single_train, start_ranks,
                      tensors_max_rel, tiny_model, weight_file)
from ftune_testing import ftune
from train_testing import metrics

STEPS, STOP, ACCUM = 16, 8, 2
GLOBAL_ROWS = 12  # micro_batch x grad_accum x ranks: 3 x 2 x 2, 2 x 2 x 3, 6 x 2 x 1
COMMON = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", "training.save_every=0"]
FULL = [*COMMON, "training.max_grad_norm=0.5", "training.weight_decay=0.1"]
LORA = [*COMMON, "training.max_grad_norm=0.05", "training.lr=1e-2", "lora.r=4", "lora.alpha=8",
        "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
TOL = 1e-5


def mb(world):
    return f"training.micro_batch={GLOBAL_ROWS // (ACCUM * world)}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory)


def sets_of(model, mode):
    return [f"model.path={model}", *(FULL if mode == "full" else LORA)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model):
    """get(strategy, mode) -> (uninterrupted 2-rank run, the same stopped at STOP), cached."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(strategy, mode):
        if (strategy, mode) not in cache:
            sets = [*sets_of(model, mode), mb(2), f"parallel.strategy={strategy}"]
            whole, stopped = root / f"{strategy}-{mode}", root / f"{strategy}-{mode}-stopped"
            ddp_train(whole, 2, *sets)
            ddp_train(stopped, 2, *sets, f"training.stop_after={STOP}")
            cache[(strategy, mode)] = (whole, stopped)
        return cache[(strategy, mode)]

    return get


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_bit_identical(a, b):
    ma, mb_ = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb_]
    assert [m["grad_norm"] for m in ma] == [m["grad_norm"] for m in mb_]
    ta, tb = load_file(weight_file(a / "final")), load_file(weight_file(b / "final"))
    assert sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in tb)


def assert_close(a, b, what):
    """Losses, grad norms and final weights within TOL; prints them (pytest -s)."""
    ma, mb_ = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == list(range(1, STEPS + 1))
    got = {"loss": max_rel(ma[STOP:], mb_[STOP:], "loss"),
           "grad_norm": max_rel(ma[STOP:], mb_[STOP:], "grad_norm"),
           "weights": tensors_max_rel(weight_file(a / "final"), weight_file(b / "final"))}
    print(f"measured {what}: " + ", ".join(f"{k} {v:.3g}" for k, v in got.items()))
    assert all(v < TOL for v in got.values()), got


@pytest.mark.parametrize("strategy,mode", [("zero1", "full"), ("zero2", "full"),
                                           ("zero2", "lora")])
def test_the_checkpoint_is_sharded_and_resumes_bit_identically(tmp_path, model, runs, strategy,
                                                               mode):
    whole, stopped = runs(strategy, mode)
    ck = stopped / "checkpoints" / f"step-{STOP}"
    assert sorted(p.name for p in (ck / "shards").iterdir()) == [
        "index.json", "rank-0-of-2.safetensors", "rank-1-of-2.safetensors"]
    assert not (ck / "optimizer.safetensors").exists()
    assert not (ck / "model.safetensors").exists() and not (ck / "adapter_model.safetensors").exists()
    index = json.loads((ck / "shards" / "index.json").read_text())
    assert index["world_size"] == 2 and index["strategy"] == strategy
    # Every parameter's ranges tile it exactly; the pieces' values are the stopped run's.
    for name, e in index["params"].items():
        numel = 1
        for d in e["shape"]:
            numel *= d
        ranges = sorted(e["shards"].values())
        assert ranges[0][0] == 0 and sum(r[1] for r in ranges) == numel, name
        assert all(r[0] + r[1] == s[0] for r, s in zip(ranges, ranges[1:])), name
    assert (mode == "lora") == all(".lora_" in n for n in index["params"])
    out = copy_run(stopped, tmp_path / "resumed")
    ddp_train(out, 2, *sets_of(model, mode), mb(2), f"parallel.strategy={strategy}",
              "training.resume=auto")
    assert_bit_identical(out, whole)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resharding_to_three_ranks_and_to_one_process(tmp_path, model, runs, mode):
    whole, stopped = runs("zero2", mode)
    three = copy_run(stopped, tmp_path / "x3")
    ddp_train(three, 3, *sets_of(model, mode), mb(3), "parallel.strategy=zero2",
              "training.resume=auto")
    assert_close(three, whole, f"{mode} zero2 x2 -> x3")
    one = copy_run(stopped, tmp_path / "one")
    single_train(one, *sets_of(model, mode), mb(1), "parallel.strategy=none",
                 "training.resume=auto")
    assert_close(one, whole, f"{mode} zero2 x2 -> one process")
    if mode == "full":  # a non-sharded strategy at several ranks: every rank reads everything
        ddp = copy_run(stopped, tmp_path / "ddp")
        ddp_train(ddp, 2, *sets_of(model, mode), mb(2), "parallel.strategy=ddp",
                  "training.resume=auto")
        assert_close(ddp, whole, "full zero2 x2 -> ddp x2")


def test_a_consolidated_checkpoint_resumes_under_zero2(tmp_path, model, runs):
    whole, _ = runs("zero2", "full")
    out = tmp_path / "old"
    single_train(out, *sets_of(model, "full"), mb(1), f"training.stop_after={STOP}")
    assert (out / "checkpoints" / f"step-{STOP}" / "optimizer.safetensors").exists()
    ddp_train(out, 2, *sets_of(model, "full"), mb(2), "parallel.strategy=zero2",
              "training.resume=auto")
    assert_close(out, whole, "consolidated one-process checkpoint -> zero2 x2")


def test_a_rank_killed_while_writing_shards_leaves_the_previous_checkpoint(tmp_path, model, runs):
    whole, _ = runs("zero2", "full")
    out = tmp_path / "run"
    port = free_port()
    sets = [*sets_of(model, "full"), mb(2), "parallel.strategy=zero2", "parallel.timeout_s=10"]
    kill = f"1:wrote its checkpoint shard of step {STOP}"
    with start_ranks(out, 2, *sets, "training.save_every=4", port=port,
                     env_of_rank=lambda r: rank_env(r, 2, port, FTUNE_TEST_KILL_AT=kill)) as ranks:
        res = ranks.wait(90)
    assert res[1].rc in (-9, 128 + 9), res[1].stderr[-2000:]
    assert res[0].rc == 1 and "rank 1" in res[0].stderr, res[0].stderr[-2000:]
    cks = out / "checkpoints"
    assert (cks / f".tmp-step-{STOP}" / "shards" / "rank-1-of-2.safetensors").exists()
    assert not (cks / f"step-{STOP}").exists()
    assert (cks / "step-4" / "trainer_state.json").exists()
    ddp_train(out, 2, *sets, "training.resume=auto")
    assert not (cks / f".tmp-step-{STOP}").exists()
    assert_bit_identical(out, whole)


def test_eval_tools_refuse_a_sharded_checkpoint(runs):
    _, stopped = runs("zero2", "full")
    ck = stopped / "checkpoints" / f"step-{STOP}"
    p = ftune("generate", "--model", ck, "--prompt", "hi", check=False)
    assert p.returncode == 1
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "sharded training checkpoint" in lines[0] and "final/" in lines[0], \
        p.stderr
