"""Naive model parallelism (parallel.strategy model_parallel, parallel.devices) in one process
against the plain one-process run, on CPU "devices" (issue #10's CPU form of the check): the same
ops run in the same order, so per-step losses, grad norms and the final model or adapter are
bit-identical, for full fine-tuning, LoRA and QLoRA, tied and untied embeddings, 2 stages and 3
(uneven: a 3-layer model over 2 devices, and 3 layers over 3), with and without activation
checkpointing. The stage split is printed; bad settings are one error line naming the key."""
import json
import subprocess

import pytest

from safetensors.torch import load_file

from ddp_util import (ADAPTER, free_port, rank_env, single_train, tiny_models, train_args,
                      weight_file)
from ftune_testing import SOURCE_DIR, ftune
from train_testing import metrics, one_error_line

STEPS = 8
FULL = [f"training.steps={STEPS}", "training.grad_accum=2", "training.micro_batch=2",
        "training.max_grad_norm=0.5", "training.weight_decay=0.1"]
LORA = [*FULL, *ADAPTER]
QLORA = [*LORA, "quant.compute_dtype=fp32"]
MODES = {"full": FULL, "lora": LORA, "qlora": QLORA}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = tiny_models(d)
    cfg = json.loads((d / "untied" / "config.json").read_text())
    cfg.update(num_hidden_layers=3, tie_word_embeddings=True)
    (d / "three.json").write_text(json.dumps(cfg))
    ftune("init-model", "--config", d / "three.json", "--out", d / "three", "--seed", "5")
    out["three"] = d / "three"
    return out


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, models):
    root, cache = tmp_path_factory.mktemp("oracle"), {}

    def get(mode, model, *extra):
        key = (mode, model, extra)
        if key not in cache:
            out = root / f"{mode}-{model}-{len(cache)}"
            single_train(out, f"model.path={models[model]}", *MODES[mode], *extra)
            cache[key] = out
        return cache[key]

    return get


def same_files(a, b):
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


@pytest.mark.parametrize("mode,model,devices", [
    ("full", "untied", "[cpu, cpu]"), ("full", "tied", "[cpu, cpu]"),
    ("lora", "tied", "[cpu, cpu]"), ("qlora", "untied", "[cpu, cpu]"),
    ("full", "three", "[cpu, cpu]"), ("lora", "three", "[cpu, cpu, cpu]")])
def test_matches_one_process_bit_for_bit(tmp_path, models, oracle, mode, model, devices):
    out = tmp_path / "mp"
    p = single_train(out, f"model.path={models[model]}", *MODES[mode],
                     "parallel.strategy=model_parallel", f"parallel.devices={devices}")
    single = oracle(mode, model)
    a, b = metrics(out), metrics(single)
    assert [m["step"] for m in a] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    assert same_files(weight_file(out / "final"), weight_file(single / "final"))
    n = devices.count("cpu")
    layers = 3 if model == "three" else 2
    # Balanced blocks, earlier stages taking the fewer layers: 3 over 2 -> 0-0, 1-2.
    want = {(2, 2): "layers 0-0 on cpu, layers 1-1 on cpu",
            (3, 2): "layers 0-0 on cpu, layers 1-2 on cpu",
            (3, 3): "layers 0-0 on cpu, layers 1-1 on cpu, layers 2-2 on cpu"}[(layers, n)]
    assert f"model_parallel: {want}" in p.stderr, p.stderr[-2000:]


def test_activation_checkpointing(tmp_path, models, oracle):
    out = tmp_path / "mp"
    single_train(out, f"model.path={models['three']}", *FULL, "model.grad_checkpointing=true",
                 "parallel.strategy=model_parallel", "parallel.devices=[cpu, cpu]")
    single = oracle("full", "three", "model.grad_checkpointing=true")
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(single)]
    assert same_files(weight_file(out / "final"), weight_file(single / "final"))


def test_explicit_split(tmp_path, models, oracle):
    out = tmp_path / "mp"
    p = single_train(out, f"model.path={models['three']}", *FULL,
                     "parallel.strategy=model_parallel", "parallel.devices=[cpu, cpu]",
                     "parallel.split=[0, 2, 3]")
    assert "model_parallel: layers 0-1 on cpu, layers 2-2 on cpu" in p.stderr, p.stderr[-2000:]
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(oracle("full", "three"))]


@pytest.mark.parametrize("sets,expected", [
    (["parallel.strategy=model_parallel", "parallel.devices=[cpu, cpu]", "parallel.split=[0, 2]"],
     "parallel.split: expected one point per stage plus the layer count"),
    (["parallel.strategy=model_parallel", "parallel.devices=[cpu, cpu]", "parallel.split=[0, 2, 2]"],
     "parallel.split: expected strictly increasing points"),
    (["parallel.strategy=model_parallel", "parallel.devices=[cpu, cpu]", "parallel.split=[0, a, 2]"],
     "parallel.split"),
    (["parallel.strategy=model_parallel"], "parallel.devices: model_parallel needs the devices"),
    (["parallel.devices=[cpu, cpu]"], "parallel.devices: only model_parallel places layers"),
    (["parallel.strategy=model_parallel", "parallel.devices=[cpu, cpu, cpu]"],
     "parallel.devices: 3 stages for 2 decoder layers"),
    (["parallel.strategy=model_parallel", "parallel.devices=[cpu, gpu7]"], "parallel.devices"),
])
def test_bad_settings_are_one_line(tmp_path, models, sets, expected):
    p = single_train(tmp_path / "run", f"model.path={models['untied']}", *FULL, *sets,
                     check=False)
    line = one_error_line(p)
    assert expected in line, line


def test_refuses_to_run_under_a_launcher(tmp_path, models):
    p = subprocess.run(train_args(tmp_path / "run", f"model.path={models['untied']}", *FULL,
                                  "parallel.strategy=model_parallel",
                                  "parallel.devices=[cpu, cpu]"),
                       env=rank_env(0, 2, free_port()), capture_output=True, text=True,
                       cwd=SOURCE_DIR, timeout=60)
    line = one_error_line(p)
    assert "model_parallel runs in one process" in line and "rank 0 of 2" in line, line
