#!/usr/bin/env python3
"""Builds ftune's sample datasets in data/ from WordNet 3.0 (Debian package `wordnet-base`).

Each example asks for the meaning of one word and answers in one fixed, distinctive style:
    "<word> (<part of speech>): <first WordNet gloss>."
e.g. "ephemeral (adjective): lasting a very short time." A small instruct model does not answer
like this by default, so fine-tuning on it shows a visible change in both loss and output.

Run once by hand; the outputs are committed (the data is not regenerated at build time):
    apt-get install wordnet-base        # or: apt-get download wordnet-base && dpkg-deb -x ... DIR
    python3 scripts/make_sample_data.py [--wordnet-dir /usr/share/wordnet] [--out data]
Only the standard library is used, and the output depends only on the WordNet files and --seed.
"""
import argparse
import json
import random
import re
from pathlib import Path

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# Senses flagged like this are left out so the sample stays neutral.
SKIP_GLOSS = re.compile(r"offensive|obscene|vulgar|disparag|slang|derogatory|ethnic slur", re.I)

INSTRUCTIONS = [
    "Define the word '{w}'.",
    "What does '{w}' mean?",
    "Give a one-line dictionary definition of '{w}'.",
    "Explain the meaning of the word '{w}'.",
]
INPUT_INSTRUCTIONS = [
    "Define the word given in the input.",
    "Give a one-line dictionary definition of the input word.",
]
CHAT_SYSTEM = "You are a concise dictionary. Answer with one line: the word, its part of speech, and its meaning."


def read_synsets(wn: Path, pos_file: str):
    """offset -> (ss_type, gloss) for one data.<pos> file."""
    out = {}
    for line in (wn / f"data.{pos_file}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # license header
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        out[fields[0]] = (fields[2], gloss.strip())
    return out


def definition(gloss: str) -> str:
    """The gloss without its quoted usage examples: 'lasting a very short time'."""
    text = gloss.split('"')[0].strip().rstrip(";").strip()
    return re.sub(r"\s+", " ", re.sub(r";\s*", "; ", text))


def candidates(wn: Path):
    """(word, pos_name, definition) for single-word lemmas' most frequent sense."""
    out = []
    for pos, pos_file in POS_FILES.items():
        synsets = read_synsets(wn, pos_file)
        for line in (wn / f"index.{pos_file}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue
            f = line.split()
            lemma, p_cnt = f[0], int(f[3])
            sense_cnt, tagsense_cnt = int(f[4 + p_cnt]), int(f[5 + p_cnt])
            offsets = f[6 + p_cnt:6 + p_cnt + sense_cnt]
            # Plain lowercase words that occur in WordNet's sense-tagged corpus (so they are real,
            # moderately common words), but not the very common ones a model knows by heart.
            if not re.fullmatch(r"[a-z]{5,14}", lemma) or not 1 <= tagsense_cnt <= 6:
                continue
            ss_type, gloss = synsets[offsets[0]]
            d = definition(gloss)
            if not d or len(d) > 120 or SKIP_GLOSS.search(gloss):
                continue
            out.append((lemma, POS_NAMES[ss_type], d))
    return out


def answer(word, pos, d):
    return f"{word} ({pos}): {d}."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet-dir", default="/usr/share/wordnet", type=Path)
    ap.add_argument("--out", default="data", type=Path)
    ap.add_argument("--seed", default=1234, type=int)
    ap.add_argument("--train", default=400, type=int)
    ap.add_argument("--valid", default=60, type=int)
    ap.add_argument("--small", default=40, type=int, help="lines in the text and chat samples")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    cands = sorted(candidates(args.wordnet_dir))
    # One sense per word, so no word appears in both train and valid.
    by_word = {}
    for word, pos, d in cands:
        by_word.setdefault(word, []).append((word, pos, d))
    words = sorted(by_word)
    rng.shuffle(words)
    picked = [rng.choice(by_word[w]) for w in words[:args.train + args.valid + 2 * args.small]]

    def alpaca(entry):
        word, pos, d = entry
        if rng.random() < 0.25:
            return {"instruction": rng.choice(INPUT_INSTRUCTIONS), "input": word,
                    "output": answer(word, pos, d)}
        return {"instruction": rng.choice(INSTRUCTIONS).format(w=word), "input": "",
                "output": answer(word, pos, d)}

    def chat(entries):
        msgs = [{"role": "system", "content": CHAT_SYSTEM}] if rng.random() < 0.5 else []
        for word, pos, d in entries:
            msgs.append({"role": "user", "content": rng.choice(INSTRUCTIONS).format(w=word)})
            msgs.append({"role": "assistant", "content": answer(word, pos, d)})
        return {"messages": msgs}

    train = picked[:args.train]
    valid = picked[args.train:args.train + args.valid]
    rest = picked[args.train + args.valid:]
    args.out.mkdir(parents=True, exist_ok=True)

    def write(name, rows):
        with open(args.out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    write("sample_train.jsonl", [alpaca(e) for e in train])
    write("sample_valid.jsonl", [alpaca(e) for e in valid])
    write("sample_text.jsonl", [{"text": answer(*e)} for e in rest[:args.small]])
    chats, i, extra = [], 0, rest[args.small:]
    while i < len(extra):
        n = 2 if rng.random() < 0.3 and i + 1 < len(extra) else 1  # some two-turn conversations
        chats.append(chat(extra[i:i + n]))
        i += n
    write("sample_chat.jsonl", chats)
    print(f"{len(cands)} candidate senses; wrote {len(train)} train, {len(valid)} valid, "
          f"{args.small} text, {len(chats)} chat examples to {args.out}")


if __name__ == "__main__":
    main()
