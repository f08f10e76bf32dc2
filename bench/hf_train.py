"""Peer for `ftune train` (bench/train_cpu.sh): full fine-tuning throughput of the transformers
Trainer on the same model dir, data, threads and torch. Two modes:
  packed  fixed-length rows of seq_len cut from the concatenated tokenized examples (plain causal
          attention, as HF packing does), a pre-tokenized tensor dataset: the same work per step
          as ftune's packed rows, so tokens/s compare directly;
  padded  one example per row, dynamically padded to the longest in the micro-batch by
          DataCollatorForSeq2Seq (labels -100 on the prompt and padding): the Trainer's usual SFT
          set-up, for the one-epoch wall-time comparison.
Tokenization mirrors ftune's alpaca format (src/data/jsonl.cpp). Prints one JSON line.
The data helpers are shared with bench/torch_train.py."""
import argparse
import json
import sys
import tempfile
import time

import torch


def alpaca_prompt(instruction, inp):  # Stanford Alpaca template, as src/data/jsonl.cpp
    if not inp:
        return ("Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\n" + instruction + "\n\n### Response:\n")
    return ("Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n" + instruction + "\n\n### Input:\n" + inp + "\n\n### Response:\n")


def load_alpaca(path, tok):
    """[(ids, labels)] per example: prompt + output + eos, loss on output and eos only."""
    out = []
    for line in open(path, encoding="utf-8"):
        if not line.strip():
            continue
        e = json.loads(line)
        p = tok(alpaca_prompt(e["instruction"], e.get("input") or ""), add_special_tokens=True).input_ids
        r = tok(e["output"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((p + r, [-100] * len(p) + r))
    return out


def packed_rows(examples, seq_len, rows):
    """input_ids, labels, segment ids and positions, each [rows, seq_len], cut from the examples'
    concatenation (cycled). As in ftune's packing, a document cut at a row end continues in the
    next row as a new segment whose positions restart at 0."""
    ids, labels, seg = [], [], []
    need = rows * seq_len
    d = 0
    while len(ids) < need:
        for i, l in examples:
            ids += i
            labels += l
            seg += [d] * len(i)
            d += 1
    ids = torch.tensor(ids[:need]).view(rows, seq_len)
    labels = torch.tensor(labels[:need]).view(rows, seq_len)
    seg = torch.tensor(seg[:need]).view(rows, seq_len)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = torch.arange(seq_len).expand(rows, seq_len)
    pos = idx - torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), dim=1).values
    return ids, labels, seg, pos


def load_model(path, attn="sdpa"):
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    m.train()
    return m


def flops_per_token(model, seq_len):  # as ftune: 6 * matmul params + attention term
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq_len


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", choices=["packed", "padded"], default="packed")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (packed mode)")
    ap.add_argument("--epochs", type=float, default=0, help="epochs (padded mode)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    tok = AutoTokenizer.from_pretrained(a.model)
    examples = load_alpaca(a.data, tok)
    model = load_model(a.model)
    if a.mode == "packed":
        ids, labels, _, _ = packed_rows(examples, a.seq_len, a.steps * a.micro_batch)
        ds = RowDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))])
        collator = default_data_collator
    else:
        # Truncate to seq_len as ftune's padding mode does; attention_mask marks real tokens.
        ds = RowDataset([{"input_ids": i[:a.seq_len], "attention_mask": [1] * len(i[:a.seq_len]),
                          "labels": l[:a.seq_len]} for i, l in examples])
        collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100,
                                          return_tensors="pt")

    step_tokens, step_ends = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            step_ends.append(self.t0)

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())

    class CountingTrainer(Trainer):  # records the input tokens (padding included) of each step
        def training_step(self, model, inputs, num_items_in_batch=None):
            step_tokens.append(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=1,
            max_steps=a.steps if a.mode == "packed" else -1,
            num_train_epochs=a.epochs if a.mode == "padded" else 1,
            learning_rate=a.lr, lr_scheduler_type=a.schedule, warmup_steps=a.warmup,
            weight_decay=a.weight_decay, max_grad_norm=1.0, seed=a.seed, data_seed=a.seed,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            disable_tqdm=True, remove_unused_columns=False)
        trainer = CountingTrainer(model=model, args=targs, train_dataset=ds, data_collator=collator,
                                  callbacks=[Timer()])
        t0 = time.perf_counter()
        res = trainer.train()
        loop_s = time.perf_counter() - t0
    dts = [b - a_ for a_, b in zip(step_ends, step_ends[1:])]
    n = len(dts)
    print(json.dumps({
        "impl": "hf_trainer", "mode": a.mode, "params": sum(p.numel() for p in model.parameters()),
        "micro_batch": a.micro_batch, "seq_len": a.seq_len, "steps": n,
        "threads": torch.get_num_threads(), "optim": str(getattr(targs.optim, "value", targs.optim)),
        "step_s": dts, "step_tokens": step_tokens[:n], "train_call_s": loop_s,
        "flops_per_token": flops_per_token(model, a.seq_len), "train_loss": res.training_loss}))

if __name__ == "__main__":
    sys.exit(main())
