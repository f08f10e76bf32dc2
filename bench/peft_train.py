"""Peer for `ftune train` with LoRA/QLoRA (bench/lora_cpu.sh): a plain PyTorch loop over
transformers' LlamaForCausalLM + PEFT LoRA from the same model dir, with the same work per step as
ftune's side: fixed-length packed rows of the bundled data (bench/hf_train.py's helpers) with the
block-diagonal mask and per-document positions ftune's packing uses (bench/torch_train.py), loss
on the response tokens, adapters on every linear (r, alpha, dropout 0), torch.optim.AdamW
(fused=True, as ftune's default), clip_grad_norm_(1.0), cosine schedule. --qlora loads the base
through bitsandbytes' 4-bit NF4 (double quantization, blocksize 64) with --compute-dtype (a dir
that is already 4-bit, bench/gpu_model.py --format nf4, loads as it is).
GPU form (bench/gpu.sh): --device cuda puts the model there (device_map), --dtype bf16 keeps the
frozen base in bf16 (adapters fp32, forward under torch.autocast(bf16): ftune's model.dtype bf16
with LoRA), --grad-ckpt turns on transformers' gradient checkpointing (non-reentrant), --mask
causal feeds plain causal rows instead of the block-diagonal mask (transformers' usual packing).
Prints one JSON line: per-step seconds and tokens, the peak memory (CUDA: max allocated over the
whole process, load included, as ftune's peak_mem_bytes; CPU: peak RSS) and the parameter counts."""
import argparse
import contextlib
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="frozen base dtype; bf16 also autocasts the forward to bf16")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--mask", choices=["docs", "causal"], default="docs")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM, get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    examples = load_alpaca(a.data, tok)
    kw = {}
    compute = torch.bfloat16 if a.compute_dtype == "bf16" else torch.float32
    prequantized = "quantization_config" in json.load(open(f"{a.model}/config.json"))
    if a.qlora and not prequantized:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
    base_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cuda = a.device.startswith("cuda")
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=base_dtype, attn_implementation="sdpa",
                                             device_map={"": a.device} if cuda else "cpu", **kw)
    if prequantized:  # the saved config names bf16; the flag decides, as ftune's quant section
        for m in model.modules():
            if hasattr(m, "compute_dtype"):
                m.compute_dtype = compute
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, 0, a.steps)
    ids, labels, seg, pos = packed_rows(examples, a.seq_len, a.steps * a.micro_batch)
    autocast = (torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16)
                if a.dtype == "bf16" else contextlib.nullcontext())

    dts, losses = [], []
    for s in range(a.steps):
        t0 = time.perf_counter()
        rows = slice(s * a.micro_batch, (s + 1) * a.micro_batch)
        kw = {"attention_mask": block_mask(seg[rows]).to(a.device),
              "position_ids": pos[rows].to(a.device)} if a.mask == "docs" else {}
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids[rows].to(a.device), labels=labels[rows].to(a.device),
                         **kw).loss
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
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device": a.device, "dtype": a.dtype, "grad_ckpt": a.grad_ckpt, "mask": a.mask,
        "final_loss": losses[-1]}))


if __name__ == "__main__":
    sys.exit(main())
