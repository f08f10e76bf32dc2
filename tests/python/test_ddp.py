"""DDP (`parallel.strategy: ddp`, Gloo on CPU) against the one-process oracle: N `ftune train`
processes started as the ranks of one run (ddp_util.py sets RANK/WORLD_SIZE/... the way torchrun
does, or runs torchrun itself), compared with one process at the same global batch
(micro_batch * world rows per micro-batch, same grad_accum), on the tiny shape, fp32.
Measured (CPU, torch 2.11) in brackets; run with -s to print them.

- Parity: 20 steps at 2, 3 and 4 ranks, full fine-tuning and LoRA, tied and untied embeddings,
  grad_accum 2, clipping active: per-step loss and grad_norm within 1e-5 relative [loss <= 1.7e-7,
  grad_norm <= 3.7e-6], the final model or PEFT adapter within 1e-5 [<= 6.9e-7]; the replicas
  line says bit-identical.
- An epoch whose rows (83) do not divide by the world size continues into the next epoch
  (training.epochs 2): the same steps, epochs and losses as one process [<= 8.5e-8].
- torchrun --no-python rendezvous (and `ftune launch`, skipped while this ftune has none) gives
  the very same (==) losses, weights and replica hash as the manual-environment spawn.
- Sharded evaluation equals one process's eval_loss within 1e-6 [1.9e-8], also when a rank
  gets no validation batch.
- A DDP checkpoint resumes in one process and vice versa (same global batch) [<= 1.6e-7 against
  the uninterrupted run]; a resume that changes the global batch is one error line, on every rank.
- Accounting: all-reduce payload per step = 4 bytes x trainable parameters (adapters only for
  LoRA; the parameters counted from final/ with safetensors) [+24 bytes: 3 scalars; 4.8e-5 full,
  6.5e-4 LoRA], ring bytes = 2(n-1)/n x payload [exact], both within 1%.
- Faults (parallel.timeout_s 5): a rank stopped (SIGSTOP) inside a step ends rank 0 after the
  timeout [5.2 s] with one line naming the all-reduce; a rank killed with -9 ends the others
  [0.2-0.7 s] naming a collective; launch-environment and parallel.* errors are one line; kill -9
  of rank 0 aimed inside checkpoint writes leaves the previous checkpoint loadable (`ftune eval`)
  and resume: auto finishes the run bit for bit like an uninterrupted one.
- The stopped or killed rank is named by the others (its heartbeat in the store stopped);
  parallel.strategy: ddp without a launcher runs a group of one, equal to one process.
Names with "slow" (the rest of the parity matrix, 4-rank variants, the checkpoint-kill loop: ~45 s)
run under ctest's `slow` label (ddp_slow); the others (~50 s) in `make test` (ddp).
"""
import datetime
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_util import (clean_env, ddp_train, free_port, max_rel, numel, rank_env, single_train,
                      start_ranks, tensors_max_rel, tiny_models, torchrun_train, train_args,
                      weight_file)
from ftune_testing import SOURCE_DIR, ftune, ftune_bin
from train_testing import metrics, one_error_line

STEPS = 20
# The global batch: micro_batch x grad_accum x world rows, with MB rows per rank and micro-step.
MB, ACCUM = 2, 2
FULL = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", "training.max_grad_norm=0.5"]
LORA = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", "training.max_grad_norm=0.05",
        "training.lr=1e-2", "lora.r=4", "lora.alpha=8",
        "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5
# Unanchored at the start: `ftune launch` prefixes each worker's lines with its rank.
REPLICAS = re.compile(r"replicas: the trained parameters of all (\d+) ranks are bit-identical "
                      r"\(hash ([0-9a-f]{16})\)$", re.M)

def record(name, value):
    """Prints a measured number (pytest -s), for the bounds quoted in the docstring."""
    print(f"measured {name}: {value:.3g}")


# --- models and cached runs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models):
    """get(mode, kind, world) -> (ddp_out, ddp_results, single_out): the DDP run and its oracle
    (one process, micro_batch MB * world), each run once per module."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(mode, kind, world):
        key = (mode, kind, world)
        if key not in cache:
            sets = [f"model.path={models[kind]}", *(FULL if mode == "full" else LORA)]
            name = f"{mode}-{kind}-x{world}"
            res = ddp_train(root / name, world, *sets, f"training.micro_batch={MB}")
            single = root / f"{name}-oracle"
            single_train(single, *sets, f"training.micro_batch={MB * world}")
            cache[key] = (root / name, res, single)
        return cache[key]

    return get


PARITY = [pytest.param("full", "preset", 2, id="full-preset-x2"),
          pytest.param("lora", "tied", 2, id="lora-tied-x2"),
          pytest.param("full", "untied", 4, id="full-untied-x4"),
          pytest.param("full", "untied", 3, id="full-untied-x3"),
          pytest.param("lora", "untied", 3, id="lora-untied-x3"),
          pytest.param("full", "tied", 2, id="slow-full-tied-x2"),
          pytest.param("lora", "untied", 2, id="slow-lora-untied-x2"),
          pytest.param("full", "tied", 4, id="slow-full-tied-x4"),
          pytest.param("lora", "untied", 4, id="slow-lora-untied-x4"),
          pytest.param("lora", "tied", 4, id="slow-lora-tied-x4")]


# --- 1, 2: parity and replicas -----------------------------------------------------------------

@pytest.mark.parametrize("mode,kind,world", PARITY)
def test_parity_with_one_process_at_the_same_global_batch(runs, mode, kind, world):
    out, res, single = runs(mode, kind, world)
    a, b = metrics(out), metrics(single)
    assert [m["step"] for m in a] == list(range(1, STEPS + 1))
    assert [m["target_tokens"] for m in a] == [m["target_tokens"] for m in b]  # the same rows
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]
    max_norm = 0.5 if mode == "full" else 0.05
    assert max(m["grad_norm"] for m in b) > max_norm, "clipping never active"
    loss, gnorm = max_rel(a, b, "loss"), max_rel(a, b, "grad_norm")
    record(f"loss {mode}-{kind}-x{world}", loss)
    record(f"grad_norm {mode}-{kind}-x{world}", gnorm)
    assert loss < LOSS_TOL and gnorm < LOSS_TOL
    assert a[-1]["loss"] < 0.97 * a[0]["loss"]  # it trained
    # final/: a model dir (full) or a PEFT adapter dir (LoRA), only from rank 0.
    if mode == "lora":
        assert (out / "final" / "adapter_config.json").exists()
        assert not (out / "final" / "model.safetensors").exists()
    w = tensors_max_rel(weight_file(out / "final"), weight_file(single / "final"))
    record(f"weights {mode}-{kind}-x{world}", w)
    assert w < WEIGHT_TOL
    assert all(r.stdout == "" for r in res[1:]), "only rank 0 prints the summary"


@pytest.mark.parametrize("mode,kind,world", PARITY)
def test_replicas_are_bit_identical(runs, mode, kind, world):
    out, res, _ = runs(mode, kind, world)
    m = REPLICAS.search(res[0].stdout)
    assert m and int(m.group(1)) == world, res[0].stdout
    assert re.search(rf"^ddp: {world} ranks; rank 0 sent [0-9.]+ MB \(ring\)", res[0].stdout, re.M)


# --- 7: communication accounting --------------------------------------------------------------

@pytest.mark.parametrize("mode,kind,world", PARITY)
def test_all_reduce_bytes_are_the_trainable_gradients(runs, models, mode, kind, world):
    out, _, _ = runs(mode, kind, world)
    final = weight_file(out / "final")
    grad_bytes = 4 * numel(final)  # fp32 gradients of every trainable parameter
    if mode == "lora":  # only the adapters are all-reduced
        assert all(".lora_" in k for k in load_file(final))
        assert numel(final) < 0.2 * numel(models[kind] / "model.safetensors")
    lines = metrics(out)
    assert len(lines) == STEPS  # log_every 1: each line is one step's traffic
    for m in lines:
        assert set(m["comm_bytes"]) == {"all_reduce"}, m  # no other collective inside a step
        payload, wire = m["comm_bytes"]["all_reduce"], m["comm_wire_bytes"]["all_reduce"]
        assert abs(payload - grad_bytes) <= 0.01 * grad_bytes, (payload, grad_bytes)
        ring = 2 * (world - 1) / world * payload
        assert abs(wire - ring) <= 0.01 * ring, (wire, ring)
        assert m["comm_exposed_s"] >= 0 and 0 <= m["comm_exposed_frac"] <= 1
    name = f"{mode}-{kind}-x{world}"
    extra = max(abs(m["comm_bytes"]["all_reduce"] - grad_bytes) for m in lines)
    record(f"payload - grad bytes {name} (bytes)", extra)
    record(f"payload vs grad bytes {name}", extra / grad_bytes)
    ring = [2 * (world - 1) / world * m["comm_bytes"]["all_reduce"] for m in lines]
    record(f"wire vs ring {name}", max(abs(m["comm_wire_bytes"]["all_reduce"] - r) / r
                                       for m, r in zip(lines, ring)))


# --- 4: torchrun ---------------------------------------------------------------------------------

def assert_same_run(out: Path, stdout: str, ref: Path, ref_stdout: str):
    """Bit-for-bit the same run: per-step losses and grad norms, final weights, replica hash."""
    a, b = metrics(out), metrics(ref)
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in a] == \
           [(m["step"], m["loss"], m["grad_norm"]) for m in b]
    wa = load_file(out / "final" / "model.safetensors")
    wb = load_file(ref / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    ha, hb = REPLICAS.search(stdout), REPLICAS.search(ref_stdout)
    assert ha and hb and ha.group(2) == hb.group(2), (stdout, ref_stdout)


def test_torchrun_rendezvous_gives_identical_losses(tmp_path, runs, models):
    out, res, _ = runs("full", "preset", 2)
    p = torchrun_train(tmp_path / "torchrun", 2, f"model.path={models['preset']}", *FULL,
                       f"training.micro_batch={MB}")
    assert_same_run(tmp_path / "torchrun", p.stdout, out, res[0].stdout)


def test_ftune_launch_gives_identical_losses(tmp_path, runs, models):
    out, res, _ = runs("full", "preset", 2)
    args = train_args(tmp_path / "launch", f"model.path={models['preset']}", *FULL,
                      f"training.micro_batch={MB}")
    p = ftune("launch", "--nproc", "2", "--master-port", "0", "--", *args[1:], env=clean_env(),
              cwd=SOURCE_DIR, timeout=180)
    assert_same_run(tmp_path / "launch", p.stdout, out, res[0].stdout)


# --- 3: rows per epoch not divisible by the world size ---------------------------------------

def rows_per_epoch(stderr: str) -> int:
    m = re.search(r"(\d+) rows per epoch", stderr)
    assert m, stderr
    return int(m.group(1))


def odd_rows_case(tmp_path, models, world):
    data = tmp_path / "train20.jsonl"
    lines = (SOURCE_DIR / "data" / "sample_train.jsonl").read_text().splitlines()[:20]
    data.write_text("\n".join(lines) + "\n")
    mb = 4 // world  # global micro-batch 4, grad_accum 2: 8 rows per step
    sets = [f"model.path={models['untied']}", f"data.train={data}", "training.steps=0",
            "training.epochs=2", "training.grad_accum=2"]
    res = ddp_train(tmp_path / "ddp", world, *sets, f"training.micro_batch={mb}")
    rows = rows_per_epoch(res[0].stderr)
    assert rows % 2 == 1 and rows % world != 0, rows  # 83 with seq_len 64
    p = single_train(tmp_path / "one", *sets, "training.micro_batch=4")
    assert rows_per_epoch(p.stderr) == rows
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    steps = -(-2 * rows // 8)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    assert [m["epoch"] for m in a] == [m["epoch"] for m in b]
    assert a[-1]["epoch"] == 2 and any(m["epoch"] == 1 for m in a)
    assert [m["target_tokens"] for m in a] == [m["target_tokens"] for m in b]
    loss = max_rel(a, b, "loss")
    record(f"loss odd rows x{world}", loss)
    assert loss < LOSS_TOL


def test_odd_rows_per_epoch_continue_into_the_next_epoch(tmp_path, models):
    odd_rows_case(tmp_path, models, 2)


def test_slow_odd_rows_per_epoch_at_4_ranks(tmp_path, models):
    odd_rows_case(tmp_path, models, 4)


# --- 5: sharded evaluation ----------------------------------------------------------------------

@pytest.mark.parametrize("valid", ["fraction", "one-row"])
def test_eval_loss_equals_one_process(tmp_path, models, valid):
    if valid == "fraction":
        vsets = ["data.valid_fraction=0.05"]  # 20 documents: several batches, split over ranks
    else:  # a single row: one valid batch, so rank 1 evaluates nothing and adds zero
        f = tmp_path / "valid1.jsonl"
        first = (SOURCE_DIR / "data" / "sample_valid.jsonl").read_text().splitlines()[0]
        f.write_text(first + "\n")
        vsets = [f"data.valid={f}"]
    sets = [f"model.path={models['untied']}", "training.steps=6", "training.eval_every=3",
            "training.eval_at_start=true", *vsets]
    ddp_train(tmp_path / "ddp", 2, *sets, f"training.micro_batch={MB}")
    single_train(tmp_path / "one", *sets, f"training.micro_batch={2 * MB}")
    a = [m for m in metrics(tmp_path / "ddp") if "eval_loss" in m]
    b = [m for m in metrics(tmp_path / "one") if "eval_loss" in m]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 3, 6]
    err = max_rel(a, b, "eval_loss")
    record(f"eval_loss {valid}", err)
    assert err < 1e-6
    assert a[0]["eval_loss"] > 0


# --- 6: resume across world sizes ---------------------------------------------------------------

RESUME = ["training.steps=10", "training.grad_accum=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, models):
    out = tmp_path_factory.mktemp("resume") / "one"
    single_train(out, f"model.path={models['untied']}", *RESUME, f"training.micro_batch={2 * MB}")
    return out


def assert_continues(out: Path, oracle: Path, from_step: int):
    a, b = metrics(out), metrics(oracle)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 11))
    err = max(max_rel(a[from_step - 1:], b[from_step - 1:], k) for k in ("loss", "grad_norm"))
    assert [m["target_tokens"] for m in a] == [m["target_tokens"] for m in b]
    return err


def test_ddp_checkpoint_resumes_in_one_process(tmp_path, models, uninterrupted):
    out = tmp_path / "run"
    sets = [f"model.path={models['untied']}", *RESUME]
    res = ddp_train(out, 2, *sets, f"training.micro_batch={MB}", "training.stop_after=5")
    assert "stopped: 5/10 steps" in res[0].stdout
    assert (out / "checkpoints" / "step-5" / "trainer_state.json").exists()
    p = single_train(out, *sets, f"training.micro_batch={2 * MB}", "training.resume=auto")
    assert "resuming from" in p.stderr and "step-5" in p.stderr
    err = assert_continues(out, uninterrupted, 6)
    record("resume ddp->one", err)
    assert err < LOSS_TOL


def test_one_process_checkpoint_resumes_under_ddp(tmp_path, models, uninterrupted):
    out = tmp_path / "run"
    sets = [f"model.path={models['untied']}", *RESUME]
    single_train(out, *sets, f"training.micro_batch={2 * MB}", "training.stop_after=5")
    res = ddp_train(out, 2, *sets, f"training.micro_batch={MB}", "training.resume=auto")
    assert "resuming from" in res[0].stderr and "step-5" in res[0].stderr
    assert REPLICAS.search(res[0].stdout)
    err = assert_continues(out, uninterrupted, 6)
    record("resume one->ddp", err)
    assert err < LOSS_TOL


def test_resume_that_changes_the_global_batch_is_one_error(tmp_path, models):
    out = tmp_path / "run"
    sets = [f"model.path={models['untied']}", *RESUME]
    ddp_train(out, 2, *sets, f"training.micro_batch={MB}", "training.stop_after=5")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # One process at micro_batch 2: global batch 2 instead of 2 x 2 ranks.
    p = single_train(out, *sets, f"training.micro_batch={MB}", "training.resume=auto", check=False)
    line = one_error_line(p)
    assert "training.micro_batch" in line and "global batch" in line, line
    assert f"{MB} x 1 x 2 -> {MB} x 1 x 1" in line, line
    # Under DDP at micro_batch 4: global batch 8 instead of 4; every rank says so, in one line.
    res = ddp_train(out, 2, *sets, f"training.micro_batch={2 * MB}", "training.resume=auto",
                    check=False)
    for r in res:
        assert r.rc == 1
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("ftune: error: "), r.stderr
        assert "global batch" in lines[0] and f"{MB} x 1 x 2 -> {2 * MB} x 1 x 2" in lines[0]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "a refused resume changed the run's files"


# --- 8: faults ----------------------------------------------------------------------------------

TIMEOUT_S = 5
ENDLESS = ["training.steps=100000", f"training.micro_batch={MB}", f"parallel.timeout_s={TIMEOUT_S}"]


def wait_for_step(ranks, step: int, deadline_s=120):
    """Waits until rank 0 has logged `step` (its progress lines on stderr)."""
    t0 = time.monotonic()
    while f"step {step}/" not in ranks.stderr(0):
        assert all(ranks.poll(r) is None for r in range(len(ranks.procs))), ranks.report()
        assert time.monotonic() - t0 < deadline_s, ranks.report()
        time.sleep(0.05)


def error_line_of(r):
    lines = r.error_lines()
    assert r.rc == 1 and len(lines) == 1, f"rank {r.rank} rc {r.rc}:\n{r.stderr[-3000:]}"
    assert r.stderr.rstrip().endswith(lines[0]), "the error is the last line"
    return lines[0]


def signal_in_step(ranks, port: int, rank: int, sig):
    """Sends `sig` to `rank` just after it enters a new step (its progress key in the run's
    TCPStore changes): the others then wait for it inside that same step, whatever the timing."""
    wait_for_step(ranks, 2)
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                       timeout=datetime.timedelta(seconds=10))
    key = f"ftune/progress/{rank}"  # ProcessGroup::mark_progress, under the "ftune" prefix
    seen = int(store.get(key))
    while int(store.get(key)) == seen:
        assert ranks.poll(rank) is None, ranks.report()
        time.sleep(0.001)  # a step takes tens of ms: the signal still lands early in it
    os.kill(ranks.procs[rank].pid, sig)
    return time.monotonic()


def test_kill_9_under_ftune_launch_ends_the_run_naming_the_rank(tmp_path, models):
    """kill -9 of one ftune worker mid-run under `ftune launch`: the launcher and the other worker
    exit within parallel.timeout_s + 10 s, the launcher naming the dead rank and its signal."""
    args = train_args(tmp_path / "run", f"model.path={models['preset']}", "training.steps=100000",
                      f"training.micro_batch={MB}", f"parallel.timeout_s={TIMEOUT_S}")
    p = subprocess.Popen([ftune_bin(), "launch", "--nproc", "2", "--master-port", "0",
                          "--", *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=clean_env(), cwd=SOURCE_DIR)
    err = ""
    try:
        pid = None
        t0 = time.monotonic()
        while "step 3/" not in err:  # rank 0's progress lines come through the launcher
            line = p.stderr.readline()
            assert line, f"launcher ended early:\n{err}"
            err += line
            m = re.match(r"launch: rank 1 pid (\d+)", line)
            if m:
                pid = int(m.group(1))
            assert time.monotonic() - t0 < 120, err
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, rest = p.communicate(timeout=TIMEOUT_S + 30)
        took = time.monotonic() - killed_at
    finally:
        if p.poll() is None:
            p.kill()
    err += rest
    record("kill -9 rank 1 under ftune launch: launcher exits after (s)", took)
    assert took < TIMEOUT_S + 10, took
    assert p.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert err.rstrip().splitlines()[-1].startswith(
        f"ftune: error: launch: rank 1 (pid {pid}) was killed by signal 9 (SIGKILL)"), err[-3000:]


@pytest.fixture(scope="module")
def stalled(tmp_path_factory, models):
    """Rank 1 stopped (SIGSTOP) inside a step: rank 0's result and how long it took to exit."""
    out = tmp_path_factory.mktemp("stall") / "run"
    port = free_port()
    with start_ranks(out, 2, f"model.path={models['untied']}", *ENDLESS, port=port) as ranks:
        t0 = signal_in_step(ranks, port, 1, signal.SIGSTOP)
        try:
            r0 = ranks.wait(TIMEOUT_S + 10, ranks=[0])[0]
            took = time.monotonic() - t0
        finally:
            os.kill(ranks.procs[1].pid, signal.SIGKILL)
    record("stall: rank 0 exit after SIGSTOP (s)", took)
    return out, r0, took


def test_stalled_rank_times_out_naming_the_collective(stalled):
    out, r0, took = stalled
    line = error_line_of(r0)
    assert TIMEOUT_S - 0.5 < took < TIMEOUT_S + 10
    assert re.search(r"^ftune: error: rank 0: all-reduce of .* \(step \d+\) timed out after 5 s "
                     r"\(parallel.timeout_s\)", line), line
    assert not (out / "final").exists()


def test_stalled_rank_is_named(stalled):
    line = error_line_of(stalled[1])
    assert re.search(r"; rank 1( \(last at step \d+\))? is not responding", line), line


@pytest.fixture(scope="module")
def killed(tmp_path_factory, models):
    """kill -9 of `victim` inside a step of a `world`-rank run: the others' results and how long
    the last of them took to exit. Cached per (world, victim)."""
    cache = {}

    def get(world, victim):
        if (world, victim) not in cache:
            out = tmp_path_factory.mktemp(f"kill{world}-{victim}") / "run"
            port = free_port()
            with start_ranks(out, world, f"model.path={models['untied']}", *ENDLESS,
                             port=port) as ranks:
                t0 = signal_in_step(ranks, port, victim, signal.SIGKILL)
                res = ranks.wait(TIMEOUT_S + 10, ranks=[r for r in range(world) if r != victim])
                took = time.monotonic() - t0
            record(f"kill rank {victim} of {world}: others exit after (s)", took)
            cache[(world, victim)] = res, took
        return cache[(world, victim)]

    return get


KILLS = [pytest.param(2, 1, id="x2-rank1"), pytest.param(2, 0, id="x2-rank0"),
         pytest.param(4, 2, id="slow-x4-rank2")]


@pytest.mark.parametrize("world,victim", KILLS)
def test_killed_rank_ends_the_others_naming_a_collective(killed, world, victim):
    res, took = killed(world, victim)
    assert took < TIMEOUT_S + 10
    for r in res:
        line = error_line_of(r)
        assert re.search(rf"^ftune: error: rank {r.rank}: (all-reduce|barrier|broadcast) of .* "
                         r"\(step \d+\) (failed|timed out)", line), line


@pytest.mark.parametrize("world,victim", [KILLS[0], KILLS[2]])
def test_killed_rank_is_named_by_the_others(killed, world, victim):
    res, _ = killed(world, victim)
    for r in res:
        assert f"rank {victim}" in error_line_of(r), error_line_of(r)


def test_mismatched_world_size_fails_on_both_ranks(tmp_path, models):
    port = free_port()
    env = {0: rank_env(0, 2, port), 1: rank_env(1, 3, port, LOCAL_WORLD_SIZE=3)}
    with start_ranks(tmp_path / "run", 2, f"model.path={models['untied']}", "training.steps=2",
                     f"parallel.timeout_s={TIMEOUT_S}", env_of_rank=env.get) as ranks:
        res = ranks.wait(TIMEOUT_S + 10)
    for r in res:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.rc == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("ftune: error: ") and "WORLD_SIZE mismatch" in lines[0], lines[0]
    assert not list((tmp_path / "run").iterdir())


def one_line_run(out: Path, env, *sets):
    p = subprocess.run(train_args(out, "training.steps=2", *sets), env=env, capture_output=True,
                       text=True, cwd=SOURCE_DIR, timeout=60)
    line = one_error_line(p)
    assert p.returncode == 1
    assert not out.exists() or not list(out.iterdir()), "nothing is written"
    return line


def test_launch_environment_errors_are_one_line(tmp_path):
    port = free_port()
    line = one_line_run(tmp_path / "a", rank_env(0, 2, port, MASTER_ADDR=None))
    assert "MASTER_ADDR is not set" in line, line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        line = one_line_run(tmp_path / "b", rank_env(0, 2, taken))
    assert f"MASTER_PORT={taken}" in line and "already in use" in line, line
    line = one_line_run(tmp_path / "c", rank_env(0, 2, port), "parallel.strategy=none")
    assert "parallel.strategy: none" in line, line


@pytest.mark.parametrize("key,value", [
    ("parallel.bucket_mb", "0"), ("parallel.bucket_mb", "-1"), ("parallel.bucket_mb", "nan"),
    ("parallel.timeout_s", "0"), ("parallel.timeout_s", "abc"), ("parallel.strategy", "fsdp4")])
def test_bad_parallel_values_are_one_line_naming_the_key(tmp_path, key, value):
    line = one_line_run(tmp_path / "run", clean_env(), f"{key}={value}")
    assert f"--set {key}={value}: {key}: expected" in line, line


def test_ddp_without_a_launcher_is_a_group_of_one(tmp_path, models, uninterrupted):
    """parallel.strategy: ddp in a process nobody launched runs DDP over a group of one (its
    collectives run; like torchrun --nproc-per-node 1) and equals the plain one-process run."""
    out = tmp_path / "run"
    sets = [f"model.path={models['untied']}", *RESUME, f"training.micro_batch={2 * MB}"]
    p = single_train(out, *sets, "parallel.strategy=ddp")
    assert "ddp: 1 rank;" in p.stdout and REPLICAS.search(p.stdout), p.stdout
    a, b = metrics(out), metrics(uninterrupted)
    err = max(max_rel(a, b, k) for k in ("loss", "grad_norm"))
    record("ddp group of one vs one process", err)
    assert err < LOSS_TOL


# --- 8d: kill -9 of rank 0 while it writes checkpoints -----------------------------------------

def complete_checkpoints(out: Path):
    ck = out / "checkpoints"
    found = [p for p in ck.glob("step-*") if (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def test_slow_kill_of_rank0_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    # A model whose checkpoint (weights + AdamW state, ~36 MB) takes a moment to write, saved every
    # step. Three kills are aimed inside a write (just after its temp dir appears), one lands
    # anywhere in a step and its save. Each time the latest complete checkpoint must load in
    # `ftune eval`, and resume: auto under DDP continues; the pieced-together run equals an
    # uninterrupted one bit for bit.
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=259, hidden_size=256,
        intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, torch_dtype="float32")
    (tmp_path / "big.json").write_text(json.dumps(cfg))
    ftune("init-model", "--config", tmp_path / "big.json", "--out", tmp_path / "big")
    steps = 16
    sets = [f"model.path={tmp_path / 'big'}", f"training.steps={steps}",
            f"training.micro_batch={MB}", "training.save_every=1", "training.keep_last=2",
            "parallel.timeout_s=30"]
    ddp_train(tmp_path / "whole", 2, *sets, timeout=600)
    text = tmp_path / "eval.txt"
    text.write_text((SOURCE_DIR / "README.md").read_text()[:4000])
    rng = random.Random(8)
    out = tmp_path / "run"
    ck = out / "checkpoints"
    mid_write = 0
    for attempt in range(4):
        done = complete_checkpoints(out)
        target = (int(done[-1].name.split("-")[1]) if done else 0) + 2
        assert target + 2 < steps
        with start_ranks(out, 2, *sets, "training.resume=auto") as ranks:
            t0 = time.monotonic()
            while not re.search(rf"^step {target}/", ranks.stderr(0), re.M):
                assert ranks.poll(0) is None, ranks.report()
                assert time.monotonic() - t0 < 300, ranks.report()
                time.sleep(0.01)
            if attempt < 3:  # aimed: just after the next checkpoint's temp dir appears
                while not list(ck.glob(".tmp-step-*")):
                    assert ranks.poll(0) is None, ranks.report()
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.05))
            else:  # anywhere in the next step and its save
                time.sleep(rng.uniform(0.0, 0.3))
            os.kill(ranks.procs[0].pid, signal.SIGKILL)
            ranks.wait(10, ranks=[0])
            mid_write += bool(list(ck.glob(".tmp-step-*")))
            r1 = ranks.wait(30 + 10, ranks=[1])[0]
        assert r1.rc != 0, r1.stderr
        latest = complete_checkpoints(out)[-1]
        assert int(latest.name.split("-")[1]) >= target - 1  # the one before the kill, or later
        p = ftune("eval", "--model", latest, "--text", text, "--seq-len", "32", "--json",
                  env=clean_env(), timeout=120)
        assert json.loads(p.stdout)["perplexity"] > 1
    record("kills that left a half-written checkpoint (of 4)", mid_write)
    assert mid_write >= 1
    res = ddp_train(out, 2, *sets, "training.resume=auto", timeout=600)
    assert "resuming from" in res[0].stderr
    a, b = metrics(out), metrics(tmp_path / "whole")
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in a] == \
           [(m["step"], m["loss"], m["grad_norm"]) for m in b]
    wa = load_file(out / "final" / "model.safetensors")
    wb = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
