"""PEFT parity of ftune's LoRA adapter files (src/lora), with transformers + peft as the oracle, fp32:
an adapter written by ftune loads in PEFT with the same logits, adapters written by PEFT load in
ftune with the same logits, `ftune merge` equals merge_and_unload, `eval`/`generate --adapter` equal
the PEFT model, and every bad adapter is one error line with nothing written. Tiny random models
from `ftune init-model`: untied GQA, tied MHA."""
import json
import shutil

import pytest
import torch

from ftune_testing import ftune, run, tool, write_json

TOL = 1e-5  # the bound (fp32 logits); measured <= 1.7e-6 (ftune scales the rank-r activations, PEFT the product)
BF16_TOL = 2 ** -5  # one bf16 ulp at |logit| ~ 4; measured 0.0
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 3

SHAPES = {
    # untied embeddings, grouped-query attention (2 kv heads for 4 query heads)
    "gqa": dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False),
    # tied embeddings, plain multi-head attention
    "tied": dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, tie_word_embeddings=True),
}


def _init_model(d, shape, seed=0, **over):
    cfg = {"model_type": "llama", "vocab_size": 259, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 256, "eos_token_id": 257,
           "initializer_range": 0.15, **SHAPES[shape], **over}
    d.mkdir(parents=True, exist_ok=True)
    write_json(d.parent / f"{d.name}.config.json", cfg)
    ftune("init-model", "--config", d.parent / f"{d.name}.config.json", "--out", d, "--seed", seed)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: _init_model(root / name, name, seed=i + 1) for i, name in enumerate(SHAPES)}


def _ids(seed=0, batch=2, seq=23):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (batch, seq), generator=g)


def _hf(model_dir, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _peft(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(model_dir), adapter_dir).eval()


def _ftune_logits(tmp, model_dir, ids, adapter=None, merge=False):
    from safetensors.torch import load_file

    out = tmp / "ftune_logits.safetensors"
    args = [tool("lora_tool"), "logits", "--model", model_dir, "--ids",
            write_json(tmp / "ids.json", ids.tolist()), "--out", out]
    if adapter:
        args += ["--adapter", adapter]
    if merge:
        args.append("--merge")
    run(args)
    t = load_file(out)
    return t["logits"], int(t["lora_params"][0])


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def _peft_adapter(model_dir, out, seed=0, **lora_kw):
    """Saves a PEFT adapter with random non-zero A and B (PEFT's B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_hf(model_dir), LoraConfig(task_type="CAUSAL_LM", **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(out)
    return out


# (shape, targets, rslora, layers): ftune's save_adapter writes names, or a regex of module paths
# when only some layers carry adapters.
# Case ids with "more" run in the slow ctest (lora_peft_more), the rest in make test (lora_peft).
FTUNE_CASES = [
    pytest.param("gqa", "q_proj,v_proj", False, "", id="gqa-names"),
    pytest.param("gqa", "all-linear", True, "", id="gqa-all-rslora-more"),
    pytest.param("tied", "k_proj,o_proj,down_proj", False, "1", id="tied-layer1"),
    pytest.param("tied", "all-linear", True, "", id="tied-all-rslora-more"),
]


@pytest.mark.parametrize("shape,targets,rslora,layers", FTUNE_CASES)
def test_ftune_adapter_loads_in_peft(models, tmp_path, shape, targets, rslora, layers):
    m = models[shape]
    adapter = tmp_path / "adapter"
    args = [tool("lora_tool"), "init", "--model", m, "--out", adapter, "--r", "4", "--alpha", "8",
            "--targets", targets, "--seed", "5"]
    if rslora:
        args.append("--rslora")
    if layers:
        args += ["--layers", layers]
    run(args)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] == rslora and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    # names when every layer is adapted, else a regex of the module paths
    assert isinstance(cfg["target_modules"], str if layers else list)
    from safetensors.torch import load_file
    for k, v in load_file(adapter / "adapter_model.safetensors").items():
        assert k.startswith("base_model.model.model.layers.") and v.dtype == torch.float32, k
    ids = _ids()
    ours, n = _ftune_logits(tmp_path, m, ids, adapter)
    pm = _peft(m, adapter)
    expected_modules = (7 if targets == "all-linear" else len(targets.split(","))) * (1 if layers else 2)
    assert n == 2 * expected_modules
    assert len([k for k, _ in pm.named_modules() if k.endswith("lora_A")]) == expected_modules
    with torch.no_grad():
        ref = pm(ids).logits
    assert _max_diff(ours, ref) < TOL
    # the adapter must matter, or the comparison proves nothing
    base_logits, _ = _ftune_logits(tmp_path, m, ids)
    assert _max_diff(base_logits, ref) > 1e-2


# PEFT-written adapters: a list, a regex string, all-linear (saved as full module paths), rslora,
# exclude_modules.
PEFT_CASES = [
    pytest.param("gqa", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), id="gqa-list"),
    pytest.param("gqa", dict(r=3, lora_alpha=6, use_rslora=True,
                             target_modules=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.up_proj)"),
                 id="gqa-regex-rslora"),
    pytest.param("gqa", dict(r=2, lora_alpha=4, target_modules="all-linear"), id="gqa-all-linear"),
    pytest.param("tied", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
                 id="tied-all-rslora-more"),
    pytest.param("tied", dict(r=4, lora_alpha=8, target_modules=["gate_proj", "o_proj"],
                              exclude_modules=["model.layers.0.mlp.gate_proj"]), id="tied-exclude-more"),
]


@pytest.mark.parametrize("shape,kw", PEFT_CASES)
def test_peft_adapter_loads_in_ftune(models, tmp_path, shape, kw):
    m = models[shape]
    adapter = _peft_adapter(m, tmp_path / "adapter", **kw)
    if kw["target_modules"] == "all-linear":  # PEFT 0.17 saves the expanded module paths
        saved = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
        assert isinstance(saved, list) and any(t.startswith("model.layers.") for t in saved)
    ids = _ids(1)
    ours, _ = _ftune_logits(tmp_path, m, ids, adapter)
    with torch.no_grad():
        ref = _peft(m, adapter)(ids).logits
    assert _max_diff(ours, ref) < TOL
    base_logits, _ = _ftune_logits(tmp_path, m, ids)
    assert _max_diff(base_logits, ref) > 1e-2


@pytest.mark.parametrize("shape,rslora", [("gqa", False), pytest.param("tied", True, id="tied-rslora-more")])
def test_merge_matches_merge_and_unload(models, tmp_path, shape, rslora):
    from safetensors.torch import load_file

    m = models[shape]
    adapter = _peft_adapter(m, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                            target_modules="all-linear", use_rslora=rslora)
    out = tmp_path / "merged"
    p = ftune("merge", "--model", m, "--adapter", adapter, "--out", out)
    assert "merged into 14 linear modules" in p.stdout
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (out / f).exists(), f
    ids = _ids(2)
    with torch.no_grad():
        ref = _peft(m, adapter).merge_and_unload()(ids).logits
        merged_hf = _hf(out)(ids).logits  # ftune's merged dir loads in transformers
    assert _max_diff(merged_hf, ref) < TOL
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    ours, n = _ftune_logits(tmp_path, m, ids, adapter, merge=True)
    assert n == 0 and _max_diff(ours, ref) < TOL
    # the merged weights themselves, key for key
    pm = _peft(m, adapter).merge_and_unload().state_dict()
    mine = load_file(out / "model.safetensors")
    assert set(mine) == {k for k in pm if not (k == "lm_head.weight" and shape == "tied")}
    assert max(_max_diff(mine[k], pm[k]) for k in mine) < 1e-6


def test_merge_bf16_equals_peft_bf16_merge(models, tmp_path):
    """--dtype bf16: W_bf16 + fp32 delta rounded once, as PEFT merges into a bf16 base."""
    from peft import PeftModel
    from safetensors.torch import load_file

    m = models["gqa"]
    adapter = _peft_adapter(m, tmp_path / "adapter", seed=4, r=4, lora_alpha=8,
                            target_modules=["q_proj", "down_proj"])
    out = tmp_path / "merged"
    ftune("merge", "--model", m, "--adapter", adapter, "--out", out, "--dtype", "bf16")
    ref = PeftModel.from_pretrained(_hf(m, torch.bfloat16), adapter).merge_and_unload().state_dict()
    mine = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for k, v in mine.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k]), k


def test_bf16_base_fp32_adapter_matches_peft(models, tmp_path):
    """A bf16 base with fp32 adapters (PEFT's autocast_adapter_dtype): same logits as PEFT."""
    from peft import PeftModel

    m = models["gqa"]
    adapter = _peft_adapter(m, tmp_path / "adapter", seed=8, r=4, lora_alpha=8,
                            target_modules="all-linear")
    ids = _ids(3)
    from safetensors.torch import load_file

    out = tmp_path / "l.safetensors"
    run([tool("lora_tool"), "logits", "--model", m, "--adapter", adapter, "--dtype", "bf16", "--ids",
         write_json(tmp_path / "ids.json", ids.tolist()), "--out", out])
    ours = load_file(out)["logits"]
    pm = PeftModel.from_pretrained(_hf(m, torch.bfloat16), adapter).eval()
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        ref = pm(ids).logits.float()
    assert _max_diff(ours, ref) <= BF16_TOL


def test_eval_with_adapter_matches_peft(models, tmp_path):
    from transformers import AutoTokenizer

    m = models["gqa"]
    adapter = _peft_adapter(m, tmp_path / "adapter", seed=6, r=4, lora_alpha=8,
                            target_modules="all-linear")
    (tmp_path / "t.txt").write_text(TEXT)
    seq = 64
    out = json.loads(ftune("eval", "--model", m, "--adapter", adapter, "--text", tmp_path / "t.txt",
                           "--seq-len", seq, "--json").stdout)
    base = json.loads(ftune("eval", "--model", m, "--text", tmp_path / "t.txt", "--seq-len", seq,
                            "--json").stdout)
    ids = AutoTokenizer.from_pretrained(m)(TEXT, return_tensors="pt").input_ids[0]
    pm = _peft(m, adapter)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq):
            w = ids[i:i + seq].unsqueeze(0)
            if w.shape[1] < 2:
                continue
            total += pm(input_ids=w, labels=w).loss.item() * (w.shape[1] - 1)
            count += w.shape[1] - 1
    assert out["tokens"] == count
    assert abs(out["nll"] - total / count) < 1e-5
    assert abs(base["nll"] - out["nll"]) > 1e-2


@pytest.mark.parametrize("shape", ["gqa", pytest.param("tied", id="tied-more")])
def test_generate_with_adapter_matches_peft(models, tmp_path, shape):
    from transformers import AutoTokenizer

    m = models[shape]
    adapter = tmp_path / "adapter"
    run([tool("lora_tool"), "init", "--model", m, "--out", adapter, "--r", "8", "--alpha", "16",
         "--targets", "all-linear", "--seed", "9"])
    prompt = "Once upon a time"
    out = json.loads(ftune("generate", "--model", m, "--adapter", adapter, "--prompt", prompt,
                           "--max-new-tokens", "12", "--json").stdout)
    base = json.loads(ftune("generate", "--model", m, "--prompt", prompt, "--max-new-tokens", "12",
                            "--json").stdout)
    ids = AutoTokenizer.from_pretrained(m)(prompt, return_tensors="pt").input_ids
    assert out["prompt_ids"] == ids[0].tolist()
    with torch.no_grad():
        ref = _peft(m, adapter).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=12, do_sample=False)
    assert out["ids"] == ref[0, ids.shape[1]:].tolist()
    assert out["ids"] != base["ids"]


# ---- bad adapters: one line, exit 1, nothing written ----

def _expect_error(tmp, args, *fragments):
    """Runs `ftune merge` (args): one error line with every fragment, exit 1, no --out."""
    out = tmp / "out"
    p = ftune("merge", *args, "--out", out, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1 and lines[0].startswith("ftune: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists()
    assert not list(tmp.glob("out.tmp-*"))
    return lines[0]


def _edit_config(adapter, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    write_json(adapter / "adapter_config.json", cfg)


def _edit_tensors(adapter, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(adapter / "adapter_model.safetensors")
    save_file(fn(t), adapter / "adapter_model.safetensors", metadata={"format": "pt"})


def test_bad_adapters(models, tmp_path):
    m = models["gqa"]
    good = _peft_adapter(m, tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    qa = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    def both(adapter, *fragments, eval_too=False):
        """merge fails; with eval_too, `eval --adapter` fails with the same line (same loader)."""
        _expect_error(tmp_path, ["--model", m, "--adapter", adapter], *fragments)
        if not eval_too:
            return
        p = ftune("eval", "--model", m, "--adapter", adapter, "--text", tmp_path / "t.txt",
                  "--seq-len", "16", check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("ftune: error: "), p.stderr
        for f in fragments:
            assert f in lines[0], lines[0]

    (tmp_path / "t.txt").write_text(TEXT)
    # modules the model lacks
    d = fresh("c_attn")
    _edit_config(d, target_modules=["c_attn"])
    both(d, "adapter_config.json: target_modules: 'c_attn' matches no module of this model", eval_too=True)
    # a module ftune cannot adapt
    d = fresh("lm_head")
    _edit_config(d, target_modules=["q_proj", "lm_head"])
    both(d, "target_modules: selects lm_head, which ftune cannot adapt")
    # a tensor of the wrong shape
    d = fresh("shape")
    _edit_tensors(d, lambda t: {**t, qa: torch.zeros(4, 47)})
    both(d, "adapter_model.safetensors: " + qa, "[4, 47] does not fit", "in_features 48")
    # r in the config differs from the tensors
    d = fresh("rank")
    _edit_config(d, r=8)
    both(d, "has rank 4, but adapter_config.json says r = 8", eval_too=True)
    # a tensor the config does not select
    d = fresh("extra")
    _edit_config(d, target_modules=["q_proj"])
    both(d, "v_proj is not selected by adapter_config.json's target_modules")
    # adapters for other bases: another hidden size, more layers
    other = _init_model(tmp_path / "wide", "gqa", hidden_size=64)
    wide = _peft_adapter(other, tmp_path / "wide_adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    both(wide, "[4, 64] does not fit", "an adapter for another base model?", eval_too=True)
    deep = _init_model(tmp_path / "deep", "gqa", num_hidden_layers=3)
    deep_adapter = _peft_adapter(deep, tmp_path / "deep_adapter", r=4, lora_alpha=8,
                                 target_modules=["q_proj"])
    both(deep_adapter, "this model has no module model.layers.2.self_attn.q_proj",
         "another base model?")
    # missing adapter_config.json; missing weights
    d = fresh("noconfig")
    (d / "adapter_config.json").unlink()
    both(d, "--adapter: no adapter_config.json (expected a PEFT adapter dir)", eval_too=True)
    d = fresh("noweights")
    (d / "adapter_model.safetensors").unlink()
    both(d, "adapter_model.safetensors: missing")
    (d / "adapter_model.bin").write_bytes(b"pickle")
    both(d, "adapter_model.safetensors: missing (adapter_model.bin, a pickle, is not read")
    both(tmp_path / "nope", "--adapter: no such directory")
    # DoRA, as PEFT writes it (config use_dora and lora_magnitude_vector tensors)
    dora = _peft_adapter(m, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"],
                         use_dora=True)
    both(dora, "adapter_config.json: use_dora: true is not supported", eval_too=True)
    _edit_config(dora, use_dora=False)
    both(dora, "lora_magnitude_vector", "DoRA weights are not supported")
    # other configs ftune would compute differently
    for key, val in (("rank_pattern", {"q_proj": 8}), ("bias", "lora_only"),
                     ("layers_to_transform", [0]), ("modules_to_save", ["lm_head"]),
                     ("fan_in_fan_out", True), ("lora_bias", True)):
        d = fresh(f"cfg_{key}")
        _edit_config(d, **{key: val})
        both(d, f"adapter_config.json: {key}: ", "is not supported")
    d = fresh("ia3")
    _edit_config(d, peft_type="IA3")
    both(d, "peft_type: expected \"LORA\"")


def test_merge_output_rules(models, tmp_path):
    m = models["tied"]
    adapter = tmp_path / "adapter"
    run([tool("lora_tool"), "init", "--model", m, "--out", adapter, "--r", "2", "--targets", "q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = ftune("merge", "--model", m, "--adapter", adapter, "--out", out, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"ftune: error: {out}: --out: directory exists and is not empty "
                                "(pass --force to replace the model files in it)")
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    ftune("merge", "--model", m, "--adapter", adapter, "--out", out, "--force")
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    for target in (m, adapter):
        p = ftune("merge", "--model", m, "--adapter", adapter, "--out", target, "--force",
                  check=False)
        assert p.returncode == 1 and "--out: is the" in p.stderr, p.stderr
    assert not (adapter / "model.safetensors").exists()
