"""Peer for `ftune train` with LoRA/QLoRA (bench/lora_cpu.sh): a plain PyTorch loop over
transformers' LlamaForCausalLM + PEFT LoRA from the same model dir, with the same work per step as
ftune's side: fixed-length packed rows of the bundled data (bench/hf_train.py's helpers) with the
block-diagonal mask and per-document positions ftune's packing uses (bench/torch_train.py), loss
on the response tokens, adapters on every linear (r, alpha, dropout 0), torch.optim.AdamW
(fused=True, as ftune's default), clip_grad_norm_(1.0), cosine schedule. --qlora loads the base
through bitsandbytes' 4-bit NF4 (double quantization, blocksize 64) with --compute-dtype.
Prints one JSON line: per-step seconds and tokens, the peak RSS and the parameter counts."""
import argparse
import json
import resource
import sys
import time

import torch

from hf_train import load_alpaca, packed_rows
from torch_train import block_mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--qlora", action="store_true")
    ap.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="fp32")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    examples = load_alpaca(a.data, tok)
    kw = {}
    if a.qlora:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if a.compute_dtype == "bf16" else torch.float32)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                             attn_implementation="sdpa", device_map="cpu", **kw)
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, 0, a.steps)
    ids, labels, seg, pos = packed_rows(examples, a.seq_len, a.steps * a.micro_batch)

    dts, losses = [], []
    for s in range(a.steps):
        t0 = time.perf_counter()
        rows = slice(s * a.micro_batch, (s + 1) * a.micro_batch)
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[rows], labels=labels[rows], attention_mask=block_mask(seg[rows]),
                     position_ids=pos[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        dts.append(time.perf_counter() - t0)
    print(json.dumps({
        "impl": "peft_bnb" if a.qlora else "peft", "micro_batch": a.micro_batch,
        "seq_len": a.seq_len, "steps": a.steps, "threads": torch.get_num_threads(),
        "trainable": sum(p.numel() for p in params),
        "step_s": dts, "step_tokens": [a.micro_batch * a.seq_len] * a.steps,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_loss": losses[-1]}))


if __name__ == "__main__":
    sys.exit(main())
