"""Oracle test for dataset tokenization: the ids and loss masks ftune computes (tests/data/data_tool)
against HF tokenizers and transformers on the same tokenizer directory.

The tokenizer is a small byte-level BPE trained here with `tokenizers` (real merges, ChatML special
tokens, a post-processor that adds a BOS), with a SmolLM2-style chat template. For chat data the
oracle is transformers' own assistant mask: the same template with {% generation %} tags around
each assistant reply and its end-of-turn, and apply_chat_template(return_assistant_tokens_mask=True).
For alpaca, the prompt is the Stanford Alpaca template, written out here independently.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from ftune_testing import SOURCE_DIR, run, tool

IGNORE = -100
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Same rendering; the generation block marks what the model should learn to produce.
TAGGED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# tatsu-lab/stanford_alpaca train.py PROMPT_DICT.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
DATA = SOURCE_DIR / "data"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("bpe")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [PROMPT_INPUT, PROMPT_NO_INPUT, SYSTEM]
    for name in ("sample_train.jsonl", "sample_text.jsonl"):
        corpus += (DATA / name).read_text(encoding="utf-8").splitlines()
    tk.train_from_iterator(corpus, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", tk.token_to_id("<|endoftext|>"))])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "chat_template": TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 8192}))
    return d


@pytest.fixture(scope="module")
def hf(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def ftune_examples(tok_dir, path, fmt):
    out = run([tool("data_tool"), tok_dir, path, fmt]).stdout
    return json.loads(out)["examples"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_alpaca_ids_and_prompt_mask(tok_dir, hf, tmp_path):
    rows = read_jsonl(DATA / "sample_train.jsonl")[:80] + read_jsonl(DATA / "sample_valid.jsonl")
    rows += [
        {"instruction": "Traduis « éphémère ».", "input": "mot: 日本語 🙂", "output": "Ça dure peu.\n  Fin."},
        {"instruction": "No input field at all.", "output": "ok"},
        {"instruction": "Literal <|im_end|> in the prompt", "input": "", "output": "and <|endoftext|> here"},
    ]
    got = ftune_examples(tok_dir, write_jsonl(tmp_path / "a.jsonl", rows), "alpaca")
    assert len(got) == len(rows)
    eos = hf.eos_token_id
    for r, g in zip(rows, got):
        prompt = (PROMPT_INPUT if r.get("input") else PROMPT_NO_INPUT).format(**{"input": "", **r})
        p = hf(prompt)["input_ids"]
        assert p[0] == hf.bos_token_id  # the post-processor's BOS is kept
        out = hf(r["output"], add_special_tokens=False)["input_ids"]
        assert g["ids"] == p + out + [eos], r
        assert g["labels"] == [IGNORE] * len(p) + out + [eos], r


def test_text_ids(tok_dir, hf, tmp_path):
    rows = read_jsonl(DATA / "sample_text.jsonl") + [{"text": "tabs\tand  spaces  ünïcödé 123456"}]
    got = ftune_examples(tok_dir, write_jsonl(tmp_path / "t.jsonl", rows), "text")
    for r, g in zip(rows, got):
        ids = hf(r["text"])["input_ids"] + [hf.eos_token_id]
        assert g["ids"] == ids and g["labels"] == ids, r


def test_chat_assistant_mask_matches_transformers(tok_dir, hf, tmp_path):
    rows = read_jsonl(DATA / "sample_chat.jsonl")
    rows += [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Define 'x'."},
                      {"role": "assistant", "content": "x (noun): a letter.\nSecond line."},
                      {"role": "user", "content": "thanks"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": " spaced "},
                      {"role": "assistant", "content": " reply with spaces "}]},
    ]
    assert sum(len(r["messages"]) > 3 for r in rows) >= 2  # multi-turn conversations included
    got = ftune_examples(tok_dir, write_jsonl(tmp_path / "c.jsonl", rows), "chat")
    assert len(got) == len(rows)
    for r, g in zip(rows, got):
        msgs = r["messages"]
        assert hf.apply_chat_template(msgs, tokenize=False) == \
            hf.apply_chat_template(msgs, tokenize=False, chat_template=TAGGED_TEMPLATE)
        ref = hf.apply_chat_template(msgs, chat_template=TAGGED_TEMPLATE, tokenize=True,
                                     return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = ref["input_ids"], ref["assistant_masks"]
        assert g["ids"] == ids, msgs
        assert g["labels"] == [t if m else IGNORE for t, m in zip(ids, mask)], msgs
        assert sum(mask) > 0


def test_errors_are_one_line_naming_file_and_line(tok_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n')
    p = run([tool("data_tool"), tok_dir, bad, "alpaca"], check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"error: {bad}:3: output: missing"


# ------------------------------------------------------------------------------------------------
# The chat path training uses (JSONL line -> ordered messages -> chat template -> ids and labels)
# against transformers' apply_chat_template, on every real template of test_chat_template.py plus
# templates that print messages, tool calls and tools with tojson.

TOJSON_TEMPLATES = {
    # Each message as a Python dict in file order: {"role", "content"} (a key-sorting
    # implementation would print {"content", "role"}).
    "tojson_messages": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m | tojson }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    # Tool calls with indent, tools with compact separators and ensure_ascii, items() order.
    "tojson_tools": (
        "{% if tools %}<|im_start|>system\n{{ tools | tojson(separators=(',', ':'), ensure_ascii=True) }}"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.tool_calls %}{{ m.tool_calls | tojson(indent=2) }}{% else %}{{ m.content }}{% endif %}"
        "{% for k, v in m.items() %}|{{ k }}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "tojson_indent_str": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m | tojson(indent='\t', sort_keys=false) }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def _oracle_example(hf, msgs, tools):
    """(ids, labels) from transformers: ids as apply_chat_template(tokenize=True) gives them; labels
    keep each assistant message's tokens, located by rendering the conversation up to it with and
    without the generation prompt. None when transformers raises or the template rewrites earlier
    turns (ftune must then reject the line)."""
    def ids(m, gen):
        return hf.apply_chat_template(m, tools=tools, tokenize=True, add_generation_prompt=gen)
    try:
        full = ids(msgs, False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start, end = ids(msgs[:i], True), ids(msgs[:i + 1], False)
            if start != end[:len(start)] or end != full[:len(end)]:
                return None
            labels[len(start):len(end)] = full[len(start):len(end)]
    except Exception:  # noqa: BLE001 - any template failure must be a failure in ftune too
        return None
    return full, labels


def test_chat_training_path_matches_transformers_on_template_corpus(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    from test_chat_template import CONVERSATIONS, REAL_TEMPLATES, WEATHER_TOOL

    templates = {**REAL_TEMPLATES, **TOJSON_TEMPLATES}
    convs = {k: v for k, v in CONVERSATIONS.items() if any(m["role"] == "assistant" for m in v)}
    rows = {name: {"messages": conv, **({"tools": [WEATHER_TOOL]} if name.startswith("tools") else {})}
            for name, conv in convs.items()}
    # Oracle first; then every data_tool run at once (each start loads LibTorch).
    jobs = []  # (template, conversation(s), jsonl path, expected examples or None for an error)
    for tname, template in templates.items():
        d = tmp_path / tname
        d.mkdir()
        (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
        hf = AutoTokenizer.from_pretrained(str(d))
        good, bad = [], []
        for cname, row in rows.items():
            want = _oracle_example(hf, row["messages"], row.get("tools"))
            (good if want else bad).append((cname, row, want))
        if good:
            jobs.append((tname, [c for c, _, _ in good], d,
                         write_jsonl(d / "good.jsonl", [r for _, r, _ in good]), [w for _, _, w in good]))
        for cname, row, _ in bad:
            jobs.append((tname, [cname], d, write_jsonl(d / f"{cname}.jsonl", [row]), None))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda j: run([tool("data_tool"), j[2], j[3], "chat"], check=False), jobs))
    compared = rejected = 0
    for (tname, cnames, d, path, want), p in zip(jobs, results):
        if want is None:
            assert p.returncode == 1 and p.stderr.startswith(f"error: {path}:1: messages"), (tname, cnames, p.stderr)
            rejected += 1
            continue
        assert p.returncode == 0, (tname, p.stderr)
        got = json.loads(p.stdout)["examples"]
        assert len(got) == len(want), tname
        for cname, (ids, labels), g in zip(cnames, want, got):
            assert g["ids"] == ids, (tname, cname)
            assert g["labels"] == labels, (tname, cname)
            compared += 1
    # Guards against a vacuous pass: most pairs render, tool calls and tojson among them.
    assert compared >= 60 and rejected >= 20, (compared, rejected)  # measured: 63 and 32


def test_chat_key_order_is_the_files(tok_dir, tmp_path):
    """With {{ m | tojson }} a key-sorting JSON type gives {"content", "role"}; transformers (and the
    file) have {"role", "content"}. The decoded ids show what the model is trained on."""
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "chat_template": TOJSON_TEMPLATES["tojson_messages"]}))
    msgs = [{"role": "user", "content": "hé"}, {"role": "assistant", "content": "ok", "z": 1, "a": [2]}]
    got = ftune_examples(d, write_jsonl(d / "c.jsonl", [{"messages": msgs}]), "chat")[0]
    from tokenizers import Tokenizer
    text = Tokenizer.from_file(str(d / "tokenizer.json")).decode(got["ids"], skip_special_tokens=False)
    assert '{"role": "user", "content": "hé"}' in text
    assert '{"role": "assistant", "content": "ok", "z": 1, "a": [2]}' in text


def test_invalid_utf8_in_a_line_names_line_and_field(tok_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xc3"}\n')
    p = run([tool("data_tool"), tok_dir, bad, "text"], check=False)
    assert p.returncode == 1 and p.stderr.strip() == f"error: {bad}:2: text: invalid UTF-8 at byte 13"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\xff"}]}\n')
    p = run([tool("data_tool"), tok_dir, bad, "chat"], check=False)
    assert p.stderr.strip() == f"error: {bad}:1: messages[1].content: invalid UTF-8 at byte 82", p.stderr
