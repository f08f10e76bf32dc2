"""Peer for `ftune bench forward`: forward+backward tokens/s of transformers' LlamaForCausalLM on
the same shape, random ids, threads and torch. Prints one JSON line like ftune's."""
import argparse
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {  # must mirror src/model/config.cpp kPresets
    "tiny": dict(vocab_size=259, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset")
    ap.add_argument("--config")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--attn", default="sdpa")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = json.load(open(a.config)) if a.config else dict(PRESETS[a.preset])
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=a.attn)).float()
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), generator=g)

    def step():
        model.zero_grad(set_to_none=False)
        model(ids, labels=ids).loss.backward()

    step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    tokens = a.batch * a.seq_len * a.steps
    flops_tok = 6 * n + 12 * model.config.num_hidden_layers * model.config.hidden_size * a.seq_len
    print(json.dumps({"impl": "transformers", "params": n, "batch": a.batch, "seq_len": a.seq_len,
                      "steps": a.steps, "threads": torch.get_num_threads(), "seconds": dt,
                      "tokens_per_s": tokens / dt, "flops_per_s": tokens / dt * flops_tok}))


if __name__ == "__main__":
    sys.exit(main())
