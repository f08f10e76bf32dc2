"""Pipeline parallelism (parallel.strategy pipeline, issue #10) against one process at the same
global batch: ranks started with the launcher variables (ddp_util.py), tiny models, fp32, 20
steps, grad_accum 4, clipping active.

- Parity: per-step losses and grad norms within 1e-5 relative of one process, final weights (or
  adapter) within 1e-5: pp 2 and pp 3 (4 layers over 3 stages: uneven) under each schedule, full
  fine-tuning and LoRA, tied and untied embeddings, QLoRA, two rounds per step, pp 2 x dp 2 at 4
  processes.
- Timeline (pipeline_timeline.json, metrics): every stage runs every forward and backward once,
  in its schedule's order, never two at once, never before its input exists on the neighbour;
  1F1B holds at most P - stage micro-batches' activations, GPipe M, naive 1 (ftune's counts).
  The chart script draws it.
- Checkpoints: a pp 2 run stopped at step 10 resumes bit-exactly at pp 2, and at pp 3 and in one
  process within 1e-5.
- Faults: a stage killed mid-pipeline ends the run naming it; pp that does not divide the world,
  more stages than layers and bad pipeline settings are one error line.
"""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from safetensors.torch import load_file

from ddp_util import (ADAPTER, ddp_train, killed_in_collective, max_rel, single_train,
                      start_ranks, tensors_max_rel, tiny_models, weight_file)
from ftune_testing import SOURCE_DIR, ftune
from train_testing import metrics, one_error_line

TOL = 1e-5
STEPS, ACCUM, MB = 20, 4, 2
FULL = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", f"training.micro_batch={MB}",
        "training.max_grad_norm=0.5", "training.weight_decay=0.1"]
LORA = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", f"training.micro_batch={MB}",
        "training.max_grad_norm=0.05", *ADAPTER]
QLORA = [*LORA, "quant.compute_dtype=fp32"]
MODES = {"full": FULL, "lora": LORA, "qlora": QLORA}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny (2 layers) untied and tied, and a 4-layer tied and untied version of it."""
    d = tmp_path_factory.mktemp("models")
    out = tiny_models(d)
    for tied in (True, False):
        cfg = json.loads((d / "untied" / "config.json").read_text())
        cfg.update(num_hidden_layers=4, tie_word_embeddings=tied)
        name = "four-tied" if tied else "four"
        (d / f"{name}.json").write_text(json.dumps(cfg))
        ftune("init-model", "--config", d / f"{name}.json", "--out", d / name, "--seed", "5")
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, models):
    root, cache = tmp_path_factory.mktemp("oracle"), {}

    def get(mode, model, dp=1):
        key = (mode, model, dp)
        if key not in cache:
            out = root / f"{mode}-{model}-dp{dp}"
            single_train(out, f"model.path={models[model]}", *MODES[mode],
                         f"training.micro_batch={MB * dp}")
            cache[key] = out
        return cache[key]

    return get


def pipeline_sets(pp, schedule, micro_batches=0):
    return ["parallel.strategy=pipeline", f"parallel.pp={pp}", f"parallel.schedule={schedule}",
            f"parallel.micro_batches={micro_batches}"]


def check_parity(out, single):
    a, b = metrics(out), metrics(single)
    assert [m["step"] for m in a] == list(range(1, STEPS + 1))
    assert [m["target_tokens"] for m in a] == [m["target_tokens"] for m in b]
    worst = (max_rel(a, b, "loss"), max_rel(a, b, "grad_norm"),
             tensors_max_rel(weight_file(out / "final"), weight_file(single / "final")))
    print(f"\n{out.parent.name}: loss {worst[0]:.2g} grad_norm {worst[1]:.2g} weights "
          f"{worst[2]:.2g}")
    assert max(worst) <= TOL


CASES = [
    # pp 2 on the 2-layer model, each schedule; tied and untied.
    ("full", "untied", 2, "naive", 1), ("full", "untied", 2, "gpipe", 1),
    ("full", "tied", 2, "1f1b", 1),
    # pp 3: 4 layers over 3 stages (1, 1, 2), each schedule, the tied embedding across 3 stages.
    ("full", "four-tied", 3, "naive", 1), ("full", "four-tied", 3, "gpipe", 1),
    ("full", "four", 3, "1f1b", 1),
    ("lora", "tied", 2, "gpipe", 1), ("lora", "four", 3, "1f1b", 1),
    ("qlora", "untied", 2, "1f1b", 1),
    # pp 2 x dp 2: DDP inside each stage, 4 processes.
    ("full", "four-tied", 2, "1f1b", 2), ("lora", "four", 2, "1f1b", 2),
]


@pytest.mark.parametrize("mode,model,pp,schedule,dp", [
    pytest.param(*c, id=f"{c[0]}-{c[1]}-pp{c[2]}-{c[3]}-dp{c[4]}") for c in CASES])
def test_parity_with_one_process(tmp_path, models, oracle, mode, model, pp, schedule, dp):
    out = tmp_path / "pipe"
    res = ddp_train(out, pp * dp, f"model.path={models[model]}", *MODES[mode],
                    *pipeline_sets(pp, schedule), timeout=300)
    check_parity(out, oracle(mode, model, dp))
    assert f"pipeline: {pp} stages x {dp} data-parallel, schedule {schedule}" in res[0].stderr


def test_two_rounds_per_step(tmp_path, models, oracle):
    """grad_accum 4 in rounds of 2 micro-batches: the same updates."""
    out = tmp_path / "pipe"
    ddp_train(out, 2, f"model.path={models['untied']}", *FULL, *pipeline_sets(2, "1f1b", 2))
    check_parity(out, oracle("full", "untied"))
    assert metrics(out)[-1]["pipeline_bubble_theory"] == pytest.approx(1 / 3)
    # MFU counts both ranks' devices: model FLOPs of the run's tokens over 2 x the peak (1e10).
    cfg = json.loads((models["untied"] / "config.json").read_text())
    w = load_file(out / "final" / "model.safetensors")
    matmul_params = sum(t.numel() for t in w.values()) - w["model.embed_tokens.weight"].numel()
    fpt = 6 * matmul_params + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * 64
    for r in metrics(out):
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / (2 * 1e10), rel=1e-9)


def spans_of(timeline, stage):
    return [s for s in timeline["spans"] if s["stage"] == stage]


@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b"])
def test_timeline(tmp_path, models, schedule):
    """The measured timeline of the last step at pp 3, M 4 (wall-clock facts only: order,
    overlap and dependencies, no durations)."""
    out = tmp_path / "pipe"
    P, M = 3, 4
    ddp_train(out, P, f"model.path={models['four']}", *FULL, "training.steps=3",
              *pipeline_sets(P, schedule))
    t = json.loads((out / "pipeline_timeline.json").read_text())
    assert (t["schedule"], t["stages"], t["micro_batches"], t["step"]) == (schedule, P, M, 3)
    theory = (P - 1) / P if schedule == "naive" else (P - 1) / (M + P - 1)
    assert t["theoretical_bubble"] == pytest.approx(theory)
    assert 0 <= t["bubble"] < 1
    eps = 1e-4  # the stages' clocks are one host's wall clock
    for s in range(P):
        mine = spans_of(t, s)
        assert sorted((x["micro_batch"], x["kind"]) for x in mine) == \
            sorted((m, k) for m in range(M) for k in "FB")
        for a, b in zip(mine, mine[1:]):  # one slot at a time, in the order run
            assert a["end"] <= b["start"] + eps
        slot = {(x["micro_batch"], x["kind"]): x for x in mine}
        for m in range(M):
            assert slot[(m, "F")]["end"] <= slot[(m, "B")]["start"] + eps
            if s > 0:  # the activation came from the previous stage
                prev = {(x["micro_batch"], x["kind"]): x for x in spans_of(t, s - 1)}
                assert prev[(m, "F")]["end"] <= slot[(m, "F")]["start"] + eps
            if s < P - 1:  # the gradient came from the next stage
                nxt = {(x["micro_batch"], x["kind"]): x for x in spans_of(t, s + 1)}
                assert nxt[(m, "B")]["end"] <= slot[(m, "B")]["start"] + eps
    # Activations held at once, by ftune's own count (not by wall time).
    want = {"naive": [1] * P, "gpipe": [M] * P, "1f1b": [P - s for s in range(P)]}[schedule]
    assert t["max_in_flight"] == want
    last = metrics(out)[-1]
    assert last["stage_max_in_flight"] == want
    assert len(last["stage_busy_s"]) == P and len(last["stage_peak_mem_bytes"]) == P
    assert last["pipeline_bubble"] == pytest.approx(t["bubble"])
    # The chart (matplotlib, from the venv).
    png = out / "pipeline_timeline.png"
    subprocess.run([str(Path(SOURCE_DIR) / ".venv" / "bin" / "python"),
                    str(Path(SOURCE_DIR) / "scripts" / "plot_pipeline_timeline.py"), str(out)],
                   check=True, capture_output=True, timeout=120)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_checkpoint_resume(tmp_path, models, oracle):
    """Stopped at step 10 at pp 2; continued at pp 2 (bit-exact), pp 3 and in one process."""
    model = models["four-tied"]
    sets = [f"model.path={model}", *FULL, "training.save_every=5"]
    whole = tmp_path / "whole"
    ddp_train(whole, 2, *sets, *pipeline_sets(2, "1f1b"))
    part = tmp_path / "part"
    ddp_train(part, 2, *sets, *pipeline_sets(2, "1f1b"), "training.stop_after=10")
    ckpt = part / "checkpoints" / "step-10"
    assert (ckpt / "shards" / "index.json").exists()
    index = json.loads((ckpt / "shards" / "index.json").read_text())
    # Each parameter is written once, by its stage; the last stage's tied copy is not.
    assert all(len(e["shards"]) == 1 for e in index["params"].values())
    assert list(index["params"]["model.embed_tokens.weight"]["shards"]) == ["rank-0-of-2.safetensors"]
    full = [m["loss"] for m in metrics(whole)]
    for name, world, extra in (("pp2", 2, pipeline_sets(2, "1f1b")),
                               ("pp3", 3, pipeline_sets(3, "gpipe")), ("single", 1, [])):
        out = tmp_path / f"resumed-{name}"
        shutil.copytree(part, out)
        if world == 1:
            single_train(out, *sets, "training.resume=auto")
        else:
            ddp_train(out, world, *sets, *extra, "training.resume=auto")
        got = [m["loss"] for m in metrics(out) if m["step"] > 10]
        if name == "pp2":
            assert got == full[10:]
        else:
            assert max(abs(a - b) / abs(b) for a, b in zip(got, full[10:])) <= TOL
    assert tensors_max_rel(weight_file(tmp_path / "resumed-pp3" / "final"),
                           weight_file(oracle("full", "four-tied") / "final")) <= TOL


def test_stage_killed_mid_pipeline(tmp_path, models):
    """Rank 1 (the last stage) dies as it sends its first gradient back: rank 0, waiting for
    it, fails within the timeout naming rank 1."""
    line, took = killed_in_collective(tmp_path / "pipe", "gradient of micro-batch",
                                      f"model.path={models['untied']}", *FULL,
                                      *pipeline_sets(2, "1f1b"))
    assert "rank 0: " in line and "rank 1" in line, line
    assert took < 40, took


def test_pp_must_divide_world(tmp_path, models):
    with start_ranks(tmp_path / "pipe", 3, f"model.path={models['untied']}", *FULL,
                     *pipeline_sets(2, "1f1b")) as ranks:
        res = ranks.wait(60)
    for r in res:
        assert r.rc == 1 and len(r.error_lines()) == 1, r.stderr[-2000:]
        assert "parallel.pp: 2 stages do not divide the 3 ranks" in r.error_lines()[0]


def test_more_stages_than_layers(tmp_path, models):
    with start_ranks(tmp_path / "pipe", 3, f"model.path={models['untied']}", *FULL,
                     *pipeline_sets(3, "1f1b")) as ranks:
        res = ranks.wait(60)
    assert any("parallel.pp: 3 stages for 2 decoder layers" in l
               for r in res for l in r.error_lines()), [r.stderr[-800:] for r in res]
    assert all(r.rc != 0 for r in res)


@pytest.mark.parametrize("sets,expected", [
    (["parallel.strategy=pipeline"], "parallel.pp: pipeline needs at least 2 stages"),
    (["parallel.strategy=pipeline", "parallel.pp=1"], "pipeline needs at least 2 stages"),
    (["parallel.strategy=ddp", "parallel.pp=2"], "only the pipeline strategy has stages"),
    (["parallel.strategy=pipeline", "parallel.pp=2", "parallel.schedule=zigzag"],
     "parallel.schedule"),
    (["parallel.strategy=pipeline", "parallel.pp=2", "parallel.micro_batches=3"],
     "parallel.micro_batches: expected 0 (= training.grad_accum) or a divisor"),
    (["parallel.strategy=pipeline", "parallel.pp=2", "parallel.split=[0, 1]"],
     "parallel.split: expected one point per stage"),
    (["parallel.strategy=pipeline", "parallel.pp=2"], "parallel.pp: 2 stages do not divide the 1"),
])
def test_config_errors(tmp_path, models, sets, expected):
    p = single_train(tmp_path / "pipe", f"model.path={models['untied']}", *FULL, *sets,
                     check=False)
    assert expected in one_error_line(p)
