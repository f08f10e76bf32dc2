"""Writes the checked-in fuzz seeds for the targets added in issue 12 (tests/fuzz/seeds/<target>/),
each a small valid input made from the repo's own configs, data samples and test fixtures.
Run from the repo root with the project venv: .venv/bin/python tests/fuzz/make_seeds.py
[--smollm2 DIR], where DIR is `ftune convert` of the venv's SmolLM2 GGUF (its tokenizer.json is
trimmed to the first 600 tokens for a seed). Seeds that record fixed crashes (crash-*) are kept.
"""
import argparse
import json
import shutil
import struct
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "tests" / "fuzz" / "seeds"
MAX_SEED = 100_000


def put(target: str, name: str, data: bytes) -> None:
    assert len(data) < MAX_SEED, (target, name, len(data))
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def lines(path: Path, n: int) -> bytes:
    return b"".join(path.read_bytes().splitlines(keepends=True)[:n])


def train_config() -> None:
    for name in ["tiny_full", "smollm2_lora", "smollm2_qlora", "smollm2_lora_ddp",
                 "tinyllama_pipeline", "codellama_fsdp"]:
        put("train_config", name + ".yaml", (ROOT / "configs" / f"{name}.yaml").read_bytes())


def jsonl() -> None:
    # First byte: format = byte % 3 (0 text, 1 alpaca, 2 chat); the rest is the file.
    put("jsonl", "text.jsonl", b"\x00" + lines(ROOT / "data/sample_text.jsonl", 4))
    put("jsonl", "alpaca.jsonl", b"\x01" + lines(ROOT / "data/sample_train.jsonl", 4))
    put("jsonl", "chat.jsonl", b"\x02" + lines(ROOT / "data/sample_chat.jsonl", 3))
    put("jsonl", "chat_multi.jsonl", b"\x02" + json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "caf\u00e9?"},
        {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "Non."}]}).encode() + b"\n")


def bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def special(i: int, content: str) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def byte_level(vocab: dict, merges: list, added: list) -> dict:
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": level,
            "post_processor": dict(level, add_prefix_space=True, trim_offsets=False),
            "decoder": dict(level, add_prefix_space=True),
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


def tokenizer_json(smollm2: Path | None) -> None:
    # ftune's byte-level tokenizer (model::write_byte_level_tokenizer).
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    added = [special(256 + i, s) for i, s in enumerate(["<s>", "</s>", "<pad>"])]
    put("tokenizer_json", "byte_level.json", json.dumps(byte_level(vocab, [], added)).encode())
    # Llama 2 style: Prepend/Replace normalizer, byte fallback, a Sequence decoder
    # (tests/tokenizer/tokenizer_test.cpp llama2_style), with a TemplateProcessing post-processor.
    v = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        v[f"<0x{b:02X}>"] = 3 + b
    v.update({"\u2581": 259, "h": 260, "i": 261, "\u2581h": 262, "\u2581hi": 263})
    llama2 = {
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {
                               "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
                  "vocab": v, "merges": ["\u2581 h", ["\u2581h", "i"]]}}
    put("tokenizer_json", "llama2_style.json", json.dumps(llama2).encode())
    if smollm2:
        t = json.loads((smollm2 / "tokenizer.json").read_text())
        keep = {tok: i for tok, i in t["model"]["vocab"].items() if i < 600}
        merges = [m for m in t["model"]["merges"]
                  if m[0] in keep and m[1] in keep and m[0] + m[1] in keep]
        t["model"]["vocab"], t["model"]["merges"] = keep, merges
        t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < 600]
        put("tokenizer_json", "smollm2_trimmed.json",
            json.dumps(t, ensure_ascii=False, separators=(",", ":")).encode())


def sentencepiece(tmp: Path) -> None:
    corpus = [l.decode() for l in (ROOT / "data/sample_text.jsonl").read_bytes().splitlines()]
    for kind, size in [("bpe", 300), ("unigram", 300)]:
        prefix = tmp / kind
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=size,
            model_type=kind, byte_fallback=kind == "bpe", character_coverage=1.0,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, minloglevel=2)
        put("sentencepiece", f"{kind}.model", Path(str(prefix) + ".model").read_bytes())


def chat_template() -> None:
    src = (ROOT / "tests/python/test_chat_template.py").read_text()
    ns: dict = {}
    # The real templates are module-level string constants; run just those assignments.
    start, end = src.index("LLAMA2 = "), src.index("REAL_TEMPLATES = {")
    exec(src[start:end], ns)
    for name in ["LLAMA2", "LLAMA3", "SMOLLM2", "CHATML", "ZEPHYR", "GEMMA", "MISTRAL_V03",
                 "QWEN25", "FUNCTIONARY"]:
        if name in ns:
            put("chat_template", name.lower() + ".jinja", ns[name].encode())
    put("chat_template", "features.jinja", (
        "{% set ns = namespace(n=0) %}{% macro f(x) %}[{{ x | upper }}]{% endmacro %}"
        "{% for m in messages if m.role != 'system' %}{% set ns.n = ns.n + loop.index %}"
        "{{ f(m['content'][:5]) ~ (m.content | length) }}{{ m | tojson }}"
        "{% if m.content is string and 'H' in m.content %}{{ m.content.strip().split(' ')[0] }}"
        "{% elif not loop.last %}{{ range(3) | join(',') }}{% else %}{{ raise_exception('x') }}"
        "{% endif %}{% endfor %}{{ ns.n }}{{ bos_token ~ eos_token }}").encode())


def adapter() -> None:
    # A PEFT LoRA adapter for adapter_fuzz's tiny Llama (hidden 16, 4 heads, 2 kv heads, 2 layers).
    def one(name: str, config: dict, shapes: dict) -> None:
        g = torch.Generator().manual_seed(0)
        tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        put("adapter", name, json.dumps(config).encode() + b"\n#safetensors#\n" +
            save(tensors, metadata={"format": "pt"}))
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None}
    out = {"q_proj": 16, "v_proj": 8, "k_proj": 8, "o_proj": 16}
    def shapes(modules, layers=(0, 1), r=2):
        s = {}
        for l in layers:
            for m in modules:
                p = f"base_model.model.model.layers.{l}.self_attn.{m}"
                s[p + ".lora_A.weight"] = (r, 16)
                s[p + ".lora_B.weight"] = (out[m], r)
        return s
    one("qv.adapter", dict(base, target_modules=["q_proj", "v_proj"]), shapes(["q_proj", "v_proj"]))
    one("regex.adapter", dict(base, target_modules=r"model\.layers\.1\.self_attn\.(k_proj|o_proj)",
                              r=1, use_rslora=True), shapes(["k_proj", "o_proj"], (1,), 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", type=Path)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/ftune_fuzz_seeds"))
    a = ap.parse_args()
    a.tmp.mkdir(parents=True, exist_ok=True)
    train_config()
    jsonl()
    tokenizer_json(a.smollm2)
    sentencepiece(a.tmp)
    chat_template()
    adapter()
    shutil.rmtree(a.tmp)


if __name__ == "__main__":
    main()
