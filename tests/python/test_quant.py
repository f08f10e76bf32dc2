"""NF4 against bitsandbytes (the oracle, on CPU in the test venv) and transformers:
packed bytes, absmax, nested statistics and the serialized quant_state equal bitsandbytes'
quantize_4bit(quant_type="nf4") on the same weights, dequantized weights equal exactly; the frozen
base measures 4.127 bits/param; `ftune quantize` writes what transformers loads, with the same
logits as ftune; a bitsandbytes-layout checkpoint (ftune's or transformers' save_pretrained) loads
in ftune like quantizing at load; load-time peak memory against the dense load."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ftune_testing import ftune, run, tool

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

ORACLE = f"bitsandbytes {bnb.__version__} quantize_4bit on CPU"


def _bnb_dict(w, blocksize=64, double_quant=True):
    q, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    d = {"": q}
    d.update({"." + k: v for k, v in st.as_dict(packed=True).items()})
    return d, F.dequantize_4bit(q, st)


@pytest.mark.parametrize("dtype,double_quant,blocksize", [
    (torch.float32, True, 64), (torch.bfloat16, True, 64), (torch.float32, False, 64),
    (torch.bfloat16, False, 128), (torch.float32, True, 128)])
def test_quantize_equals_bitsandbytes(tmp_path, dtype, double_quant, blocksize):
    print("oracle:", ORACLE)
    g = torch.Generator().manual_seed(0)
    weights = {
        "a": torch.randn(128, 64, generator=g) * 0.05,
        "b": torch.randn(172, 64, generator=g) * 0.02,
        "partial": torch.randn(100, 2, generator=g),  # 200 elements: a partial last block
        "big": torch.randn(640, 448, generator=g) * 0.01,  # 4480 blocks: 18 nested blocks
        "zeros": torch.cat([torch.zeros(64, 2), torch.randn(64, 2, generator=g)]),
    }
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    src, out = tmp_path / "w.safetensors", tmp_path / "q.safetensors"
    save_file(weights, src)
    args = ["quantize-file", "--in", src, "--out", out, "--blocksize", str(blocksize)]
    run([tool("quant_tool"), *args, *([] if double_quant else ["--no-double-quant"])])
    got = load_file(out)
    for name, w in weights.items():
        want, deq = _bnb_dict(w, blocksize, double_quant)
        assert set(k for k in got if k.startswith(name + ".") and k != name + ".dequant") | {name} == \
            {name + s for s in want}, name
        for suffix, v in want.items():
            mine = got[name + suffix]
            assert mine.dtype == v.dtype and mine.shape == v.shape, (name + suffix, mine.shape, v.shape)
            assert torch.equal(mine, v), name + suffix
        # Dequantized weights: the same bits (-0.0 and 0.0 compared as bits too).
        mine = got[name + ".dequant"]
        assert mine.dtype == deq.dtype
        assert torch.equal(mine.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           deq.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name


def _init(tmp_path, name="tiny", **cfg):
    d = tmp_path / name
    if not cfg:
        ftune("init-model", "--preset", "tiny", "--out", d, "--seed", "3")
        return d
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 259,
         "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
         "torch_dtype": "float32", "bos_token_id": 256, "eos_token_id": 257}
    c.update(cfg)
    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(c))
    ftune("init-model", "--config", cfg_file, "--out", d, "--seed", "3")
    return d


def _load(model_dir, *extra, ids=None, out=None):
    args = [tool("quant_tool"), "load", "--model", model_dir, *extra]
    if ids is not None:
        args += ["--ids", ",".join(map(str, ids)), "--out", out]
    p = run(args)
    j = json.loads(p.stdout.strip().splitlines()[-1])
    if ids is not None:
        j["logits"] = load_file(out)["logits"]
    return j


def test_frozen_base_is_4127_bits_per_param(tmp_path):
    d = _init(tmp_path, "mid", hidden_size=256, intermediate_size=704, num_attention_heads=4,
              num_key_value_heads=4)
    j = _load(d, "--quant")
    n = 2 * (4 * 256 * 256 + 3 * 256 * 704)
    assert j["nf4_params"] == n
    bits = j["bits_per_param"]
    print(f"frozen-base NF4 linears: {bits:.4f} bits/param ({j['nf4_bytes']} bytes for {n} params)")
    assert abs(bits - 4.127) <= 0.01 * 4.127
    # Without double quantization the absmax costs 32 bits per 64 weights: 4.5 bits/param.
    q = tmp_path / "q45"
    ftune("quantize", "--model", d, "--out", q, "--no-double-quant")
    j = _load(q)
    assert abs(j["bits_per_param"] - 4.5) <= 0.01 * 4.5, j


def _bnb_of_dense(model_dir, name, dtype):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor(name).to(dtype)
    return _bnb_dict(w)[0]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quantize_cli_writes_bitsandbytes_layout_that_transformers_loads(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    print("oracle:", ORACLE, "+ transformers AutoModelForCausalLM (bitsandbytes 4-bit on CPU)")
    d = _init(tmp_path)
    q = tmp_path / "q"
    p = ftune("quantize", "--model", d, "--out", q, "--dtype", dtype, "--compute-dtype", "fp32")
    assert "bits/param" in p.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        set(os.listdir(q))
    cfg = json.loads((q / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["_load_in_4bit"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "float32" and qc["bnb_4bit_quant_storage"] == "uint8"
    tdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    # Every linear's keys and values equal QuantState.as_dict(packed=True) of the same weight.
    got = load_file(q / "model.safetensors")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        dense_names = list(f.keys())
    for name in dense_names:
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            for suffix, v in _bnb_of_dense(d, name, tdtype).items():
                assert torch.equal(got[name + suffix], v), name + suffix
        else:
            with safe_open(str(d / "model.safetensors"), "pt") as f:
                assert torch.equal(got[name], f.get_tensor(name).to(tdtype)), name
    ids = [256, 5, 72, 101, 108, 108, 111, 33, 9]
    mine = _load(q, ids=ids, out=tmp_path / "l.safetensors")["logits"]
    hf = AutoModelForCausalLM.from_pretrained(q, device_map="cpu", dtype=tdtype)
    assert type(hf.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.float()
    diff = (mine - theirs).abs().max().item()
    print(f"ftune vs transformers+bitsandbytes logits ({dtype} base, fp32 compute): max |diff| {diff:.3g}")
    assert diff <= (1e-5 if dtype == "fp32" else 2e-2)


def test_bitsandbytes_checkpoints_load_like_quantizing_at_load(tmp_path):
    """ftune's own bnb-layout file and transformers' save_pretrained of a load_in_4bit model both
    load without re-quantizing and give the logits of quantizing the dense model at load."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    d = _init(tmp_path)
    ids = [256, 40, 41, 42, 43, 44]
    at_load = _load(d, "--quant", "--compute-dtype", "fp32", ids=ids, out=tmp_path / "a.st")
    q = tmp_path / "q"
    ftune("quantize", "--model", d, "--out", q, "--compute-dtype", "fp32")
    stored = _load(q, ids=ids, out=tmp_path / "b.st")
    assert torch.equal(at_load["logits"], stored["logits"])
    assert stored["nf4_bytes"] == at_load["nf4_bytes"] and stored["nf4_params"] == at_load["nf4_params"]

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu",
                                              dtype=torch.float32)
    t = tmp_path / "hf4"
    hf.save_pretrained(t)
    from_hf = _load(t, ids=ids, out=tmp_path / "c.st")
    assert torch.equal(from_hf["logits"], at_load["logits"])
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.float()
    diff = (from_hf["logits"] - theirs).abs().max().item()
    print(f"transformers-saved 4-bit checkpoint in ftune vs transformers: max |diff| {diff:.3g}")
    assert diff <= 1e-5


def test_load_time_peak_memory_is_the_4bit_model_plus_one_weight(tmp_path):
    d = _init(tmp_path, "wide", hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8)
    dense = _load(d)
    q = _load(d, "--quant")
    dense_peak = dense["peak"] - dense["rss_before"]
    q_peak = q["peak"] - q["rss_before"]
    largest = 4 * 512 * 2048  # one fp32 MLP weight, the largest dense tensor read for quantizing
    held = q["nf4_bytes"] + q["dense_bytes"]
    runtime = dense_peak - dense["dense_bytes"]  # what a load costs beyond the weights it keeps
    print(f"load peak above baseline: dense {dense_peak / 1e6:.1f} MB ({dense['dense_bytes'] / 1e6:.1f} MB "
          f"of weights), 4-bit {q_peak / 1e6:.1f} MB ({held / 1e6:.1f} MB held, one dense weight "
          f"{largest / 1e6:.1f} MB)")
    # The 4-bit model, one dense weight being quantized and its file pages (one read chunk), and
    # the same fixed cost the dense load has: never a dense copy of the model.
    assert q_peak <= held + 2 * largest + runtime + 2e6
    assert q_peak < 0.45 * dense_peak


def test_quantize_errors_are_one_line_and_write_nothing(tmp_path):
    d = _init(tmp_path)
    out = tmp_path / "out"
    for args, msg in [
        (["--blocksize", "48"], "quantize: --blocksize: 48 is not supported: expected 64, 128, 256, "
                                "512, 1024, 2048 or 4096"),
        (["--compute-dtype", "fp16"], "fp16 is not supported"),
    ]:
        p = ftune("quantize", "--model", d, "--out", out, *args, check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("ftune: error: ") and msg in p.stderr, p.stderr
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p = ftune("quantize", "--model", d, "--out", out, check=False)
    assert p.returncode == 1 and "not empty (pass --force" in p.stderr
    assert os.listdir(out) == ["keep.txt"]
    ftune("quantize", "--model", d, "--out", out, "--force")
    assert (out / "keep.txt").read_text() == "x" and (out / "model.safetensors").exists()


def test_bad_bitsandbytes_checkpoint_is_one_clear_error(tmp_path):
    d = _init(tmp_path)
    q = tmp_path / "q"
    ftune("quantize", "--model", d, "--out", q)
    t = load_file(q / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    t[key + ".absmax"] = t[key + ".absmax"][:-1].clone()
    save_file(t, q / "model.safetensors", metadata={"format": "pt"})
    p = ftune("eval", "--model", q, "--text", str(d / "config.json"), "--seq-len", "16", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    n = 64 * 172 // 64
    assert p.stderr.strip() == (f"ftune: error: {q / 'model.safetensors'}: {key}.absmax: shape [{n - 1}], "
                                f"expected [{n}]"), p.stderr
