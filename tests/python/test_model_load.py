"""Model loading without a random init: peak memory while loading (VmHWM, measured by
`model_tool load-memory`) against the weights' bytes, the loaded values against Python's
safetensors, and the loader's refusals (sizes that overflow or exceed RAM, an integer dtype for a
float weight), each one `ftune: error:` line and exit 1.

The 7B-shaped load (a synthetic llama-2-7b bf16 checkpoint, 13.5 GB, written shard by shard) runs
only with FTUNE_LOAD_7B=1 (ctest model_load_7b, label slow)."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftune_testing import ftune, run, tiny_llama, tool, write_json

BOUND = 1.2  # peak above the baseline, as a multiple of the loaded weights' bytes


def _load_memory(model_dir, *extra):
    p = run([tool("model_tool"), "load-memory", "--model", model_dir, *extra], timeout=1500)
    return json.loads(p.stdout)


def _file_sums(model_dir):
    """fp64 sum of every tensor in the model dir's safetensors files, read by Python."""
    sums = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sums[k] = st.get_tensor(k).double().sum().item()
    return sums


def _check_peak(m, label):
    grown = m["peak"] - m["rss_before"]
    ratio = grown / m["weight_bytes"]
    print(f"{label}: weights {m['weight_bytes'] / 1e6:.1f} MB, peak above baseline "
          f"{grown / 1e6:.1f} MB = {ratio:.3f}x, load {m['seconds']:.2f} s")
    assert ratio <= BOUND, (label, ratio, m)


@pytest.fixture(scope="module")
def smollm2_bf16(tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2") / "m"
    ftune("init-model", "--preset", "smollm2-135m", "--dtype", "bf16", "--out", d)
    return d


@pytest.mark.parametrize("dtype,elem", [("bf16", 2), ("fp32", 4)])
def test_smollm2_load_peak_and_values(smollm2_bf16, dtype, elem):
    m = _load_memory(smollm2_bf16, "--dtype", dtype)
    expect = _file_sums(smollm2_bf16)
    numel = 0
    with safe_open(smollm2_bf16 / "model.safetensors", "pt") as st:
        for k in st.keys():
            assert st.get_slice(k).get_dtype() == "BF16"
            numel += math.prod(st.get_slice(k).get_shape())
    assert m["weight_bytes"] == numel * elem
    assert set(m["sums"]) == set(expect)
    for k, v in expect.items():
        assert m["sums"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k
    _check_peak(m, f"smollm2-135m bf16 file -> {dtype}")


def test_sharded_transformers_checkpoint_loads_exactly(tmp_path):
    model, _ = tiny_llama(tmp_path / "m")
    d = tmp_path / "sharded"
    model.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    m = _load_memory(d)
    ref = {k: v.double().sum().item() for k, v in model.state_dict().items()}
    assert set(m["sums"]) == set(ref)
    for k, v in ref.items():
        assert m["sums"][k] == v, k


# ---- refusals -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", d)
    return d


def _eval_error(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    p = ftune("eval", "--model", model_dir, "--text", text, "--seq-len", "8", check=False,
              timeout=60)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line]
    assert len(lines) == 1, p.stderr
    return lines[0]


def _with_config(tiny_dir, tmp_path, **changes):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    write_json(d / "config.json", cfg)
    return d, cfg


def _hf_num_parameters(cfg):
    """transformers' parameter count for `cfg` (built on the meta device), extrapolated in the
    layer count from 1 and 2 layers so that absurd layer counts need no memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def count(layers):
        c = dict(cfg, num_hidden_layers=layers)
        with torch.device("meta"):
            m = LlamaForCausalLM(LlamaConfig(**c))
        return sum(p.numel() for p in m.parameters())

    one, two = count(1), count(2)
    return one + (cfg["num_hidden_layers"] - 1) * (two - one)


def _ram_gb():
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 1099511627776),
                                         ("intermediate_size", 10**12),
                                         ("vocab_size", 10**11)])
def test_model_larger_than_ram_names_file_and_field(tiny_dir, tmp_path, field, value):
    d, cfg = _with_config(tiny_dir, tmp_path, **{field: value})
    need = _hf_num_parameters(cfg) * 4 / 1e9  # the tiny preset is float32
    assert _eval_error(d, tmp_path) == (
        f"ftune: error: {d}/config.json: {field}: model needs {need:.1f} GB in float32, "
        f"more than this machine's {_ram_gb():.1f} GB")


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 2**62), ("hidden_size", 2**62)])
def test_overflowing_size_names_file_and_field(tiny_dir, tmp_path, field, value):
    d, _ = _with_config(tiny_dir, tmp_path, **{field: value})
    assert _eval_error(d, tmp_path) == (
        f"ftune: error: {d}/config.json: {field}: {value} makes the model's byte count overflow int64")


def test_float_size_is_not_an_integer(tiny_dir, tmp_path):
    d, _ = _with_config(tiny_dir, tmp_path, intermediate_size=1e12)
    assert _eval_error(d, tmp_path) == (
        f"ftune: error: {d}/config.json: intermediate_size: expected an integer, got 1000000000000.0")


def test_init_model_refuses_a_model_larger_than_ram(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 10**12,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    write_json(tmp_path / "config.json", cfg)
    p = ftune("init-model", "--config", tmp_path / "config.json", "--out", tmp_path / "o",
              check=False, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line]
    assert len(lines) == 1 and "intermediate_size: model needs" in lines[0], p.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_integer_dtype_for_a_float_weight_is_rejected(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    w = load_file(d / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"].view(torch.int32)  # same bytes, relabelled I32
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    assert _eval_error(d, tmp_path) == (
        f"ftune: error: {d}/model.safetensors: model.norm.weight: dtype I32, "
        "expected a float dtype (F32/BF16/F16)")


# ---- 7B ---------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("FTUNE_LOAD_7B") != "1", reason="slow: set FTUNE_LOAD_7B=1")
def test_llama2_7b_bf16_loads_within_bound(tmp_path):
    """Writes a llama-2-7b-shaped bf16 checkpoint tensor by tensor into ~2 GB shards (names and
    shapes from transformers' model on the meta device; tensor i filled with a constant that bf16
    holds exactly), then loads it with ftune."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16",
                      bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        shapes = [(k, tuple(p.shape)) for k, p in LlamaForCausalLM(cfg).named_parameters()]
    d = tmp_path / "llama7b"
    d.mkdir()
    cfg.to_json_file(d / "config.json")
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if cur and size + n > 2 * 10**9:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map, expect, total = {}, {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            value = (len(expect) % 15 + 1) / 16  # exact in bf16
            tensors[name] = torch.full(shape, value, dtype=torch.bfloat16)
            expect[name] = value * tensors[name].numel()
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, d / fname, metadata={"format": "pt"})
        del tensors
    write_json(d / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})

    m = _load_memory(d)
    assert m["weight_bytes"] == total
    for k, v in expect.items():
        assert m["sums"][k] == v, k
    _check_peak(m, "llama-2-7b bf16")
