"""End-to-end checks of `ftune init-model`, `eval` and `generate` against transformers, and the
bad-input cases of the model loader (one clear error line, non-zero exit, never a crash)."""
import json
import math
import shutil
import struct

import pytest
import torch

from ftune_testing import ftune, rel_err, run, tiny_llama, tool, write_json

TEXT = ("The quick brown fox jumps over the lazy dog. " * 7 +
        "Café naïve résumé — 東京 🙂 def f(x):\n    return x * 2\n\n\n  spaces   and tabs\t!\n") * 3


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("init") / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", d, "--seed", "3")
    return d


def test_init_model_loads_in_transformers_with_identical_logits(init_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(init_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(init_dir)
    ids = torch.tensor([tok("hello world, héllo")["input_ids"]])
    out = tmp_path / "o.safetensors"
    run([tool("model_tool"), "--model", init_dir, "--ids", write_json(tmp_path / "i.json", ids.tolist()),
         "--out", out])
    with torch.no_grad():
        ref = model(ids).logits
    assert torch.equal(load_file(out)["logits"], ref)


def test_init_model_seed_and_config(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cfg = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 50,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
    write_json(tmp_path / "config.json", cfg)
    for d, seed in ((a, 1), (b, 1), (c, 2)):
        ftune("init-model", "--config", tmp_path / "config.json", "--out", d, "--seed", seed)
    fa, fb, fc = ((d / "model.safetensors").read_bytes() for d in (a, b, c))
    assert fa == fb and fa != fc
    written = json.loads((a / "config.json").read_text())
    for k, v in cfg.items():
        assert written[k] == v, k


def _hf_eval(model_dir, text, seq_len):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = tok(text, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = ids[i:i + seq_len].unsqueeze(0)
            if w.shape[1] < 2:
                continue
            loss = model(w, labels=w).loss
            total += loss.item() * (w.shape[1] - 1)
            count += w.shape[1] - 1
    return total / count, count


@pytest.mark.parametrize("seq_len,batch", [(64, 1), (50, 3)])
def test_eval_matches_transformers_loop(tmp_path, seq_len, batch):
    model, path = tiny_llama(tmp_path / "m", vocab_size=259, bos_token_id=256, eos_token_id=257)
    from ftune_testing import SOURCE_DIR  # noqa: F401
    # give the random model ftune's byte-level tokenizer, written by init-model
    ftune("init-model", "--preset", "tiny", "--out", tmp_path / "t")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "t" / f, path / f)
    (tmp_path / "text.txt").write_text(TEXT)
    out = json.loads(ftune("eval", "--model", path, "--text", tmp_path / "text.txt", "--seq-len",
                           seq_len, "--batch", batch, "--json").stdout)
    nll, count = _hf_eval(path, TEXT, seq_len)
    assert out["tokens"] == count
    assert abs(out["nll"] - nll) / nll < 1e-4
    assert abs(out["perplexity"] - math.exp(nll)) / math.exp(nll) < 1e-4


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_generate_matches_transformers(init_dir, chat):
    from transformers import AutoTokenizer, LlamaForCausalLM

    prompt = "Once upon a time"
    args = ["generate", "--model", init_dir, "--prompt", prompt, "--max-new-tokens", "24", "--json"]
    if chat:
        args.append("--chat")
    out = json.loads(ftune(*args).stdout)
    tok = AutoTokenizer.from_pretrained(init_dir)
    model = LlamaForCausalLM.from_pretrained(init_dir)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt")
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    assert out["prompt_ids"] == ids[0].tolist()
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out["ids"] == ref[0, ids.shape[1]:].tolist()
    assert out["text"] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_sampling_is_seeded(init_dir):
    a = ftune("generate", "--model", init_dir, "--prompt", "x", "--temperature", "0.8", "--top-p",
              "0.9", "--seed", "5", "--json").stdout
    b = ftune("generate", "--model", init_dir, "--prompt", "x", "--temperature", "0.8", "--top-p",
              "0.9", "--seed", "5", "--json").stdout
    assert a == b


def _expect_error(args, *fragments):
    p = ftune(*args, check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = [l for l in p.stderr.strip().splitlines() if l]
    assert len(lines) == 1, p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in p.stderr and "Segmentation" not in p.stderr


def _copy(init_dir, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(init_dir, d)
    return d


def test_bad_inputs(init_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    ev = lambda d, *more: ["eval", "--model", d, "--text", text, "--seq-len", "32", *more]

    # truncated safetensors
    d = _copy(init_dir, tmp_path, "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(ev(d), "model.safetensors")

    # header length lies (larger than the file)
    d = _copy(init_dir, tmp_path, "lying")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:])
    _expect_error(ev(d), "model.safetensors")

    # missing tensor / shape mismatch: rewrite the weights with python safetensors
    from safetensors.torch import load_file, save_file
    w = load_file(init_dir / "model.safetensors")
    d = _copy(init_dir, tmp_path, "missing")
    save_file({k: v for k, v in w.items() if k != "model.norm.weight"}, d / "model.safetensors")
    _expect_error(ev(d), "missing tensor model.norm.weight")
    d = _copy(init_dir, tmp_path, "shape")
    w2 = dict(w)
    w2["model.norm.weight"] = torch.ones(7)
    save_file(w2, d / "model.safetensors")
    _expect_error(ev(d), "model.norm.weight", "shape")

    # unknown config field values
    for key, val, frag in (("hidden_act", "gelu", "hidden_act"),
                           ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_scaling"),
                           ("model_type", "gpt2", "model_type")):
        d = _copy(init_dir, tmp_path, "cfg_" + key)
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = val
        write_json(d / "config.json", cfg)
        _expect_error(ev(d), "config.json", frag)

    # missing tokenizer
    d = _copy(init_dir, tmp_path, "notok")
    (d / "tokenizer.json").unlink()
    _expect_error(ev(d), "no tokenizer.json or tokenizer.model")

    # sequence longer than max_position_embeddings (tiny preset: 512)
    _expect_error(["eval", "--model", init_dir, "--text", text, "--seq-len", "4096"],
                  "max_position_embeddings")
    _expect_error(["generate", "--model", init_dir, "--prompt", "hi", "--max-new-tokens", "600"],
                  "max_position_embeddings")
    # missing files and bad flags
    _expect_error(["eval", "--model", tmp_path / "nope", "--text", text, "--seq-len", "8"], "nope")
    _expect_error(["init-model", "--preset", "huge", "--out", tmp_path / "x"], "unknown name")


def test_help_lists_every_flag():
    out = ftune("--help").stdout
    for cmd in ("eval", "generate", "tokenize", "init-model"):
        assert cmd in out
    gen = ftune("generate", "--help").stdout
    for flag in ("--max-new-tokens", "--greedy", "--temperature", "--top-p", "--seed", "--chat"):
        assert flag in gen
