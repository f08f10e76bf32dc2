"""Random-weight Llama model dirs for the GPU benchmarks (bench/gpu.sh), written fast: each tensor
is drawn on the GPU (normal(0, initializer_range), norms 1) and saved in HF layout, bf16, or with
the decoder's linears in bitsandbytes' NF4 layout (quantize_4bit on the GPU, double quantization,
blocksize 64, the keys and quantization_config `ftune quantize` and transformers write). ftune and
the peers (transformers, PEFT, bitsandbytes) then load the same files. `ftune init-model` draws on
one CPU thread (about a minute for a 7B shape) and cannot write NF4 without first writing the dense
model (140 GB for Llama-2-70B); this writer needs one dense weight at a time, on the GPU.
The shape is ftune's preset (`ftune memory --model NAME --json`'s model.config) or a config.json;
--layers N keeps the width and cuts the depth. The tokenizer files come from --tokenizer (an
`ftune init-model` dir: the byte-level tokenizer).
  python bench/gpu_model.py --config CONFIG.json --out DIR --format bf16|nf4
         --tokenizer DIR [--layers N] [--device cuda] [--seed 0]
Prints one JSON line: parameters, bytes written, seconds."""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# What `ftune quantize` writes (and transformers' save_pretrained of a 4-bit model).
QUANT_CONFIG = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
    "quant_method": "bitsandbytes"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 4 << 30


def shapes(c):
    """(name, shape) of every weight, in HF names, layer by layer."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c.get("head_dim") or (
        c["hidden_size"] // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, shape in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            yield p + name + ".weight", shape
    yield "model.norm.weight", (h,)
    if not c.get("tie_word_embeddings"):
        yield "lm_head.weight", (c["vocab_size"], h)


def nf4_tensors(name, w):
    """bitsandbytes' serialized NF4 keys of weight `name` (quantized on w's device), on the CPU."""
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                            quant_storage=torch.uint8)
    out = {name: q.cpu()}
    out.update({f"{name}.{k}": v.cpu() for k, v in st.as_dict(packed=True).items()})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="config.json, or ftune memory --json output")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=["bf16", "nf4"], default="bf16")
    ap.add_argument("--tokenizer", required=True, help="dir whose tokenizer files to copy")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N layers (0 = all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    c = json.loads(Path(a.config).read_text())
    c = c.get("model", {}).get("config", c)  # `ftune memory --json` nests it
    if a.layers:
        c["num_hidden_layers"] = a.layers
    c["torch_dtype"] = "bfloat16"
    if a.format == "nf4":
        c["quantization_config"] = QUANT_CONFIG
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(a.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(c, indent=2))

    g = torch.Generator(device=a.device).manual_seed(a.seed)
    std = c.get("initializer_range", 0.02)
    shard, shard_bytes, index, n_shards, params, written = {}, 0, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shards, written
        if not shard:
            return
        n_shards += 1
        fname = f"model-{n_shards:05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        for k in shard:
            index[k] = fname
        written += shard_bytes
        shard, shard_bytes = {}, 0

    for name, shape in shapes(c):
        params += int(torch.Size(shape).numel())
        if name.endswith("norm.weight"):
            w = torch.ones(shape, dtype=torch.bfloat16, device=a.device)
        else:
            w = torch.empty(shape, dtype=torch.bfloat16, device=a.device).normal_(0, std,
                                                                               generator=g)
        quantize = a.format == "nf4" and any(f".{p}." in name for p in LINEARS)
        tensors = nf4_tensors(name, w) if quantize else {name: w.cpu()}
        for k, v in tensors.items():
            shard[k] = v.contiguous()
            shard_bytes += v.numel() * v.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    if n_shards == 1:
        (out / "model-00001.safetensors").rename(out / "model.safetensors")
    else:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": written}, "weight_map": index}, indent=2))
    print(json.dumps({"out": str(out), "format": a.format, "layers": c["num_hidden_layers"],
                      "parameters": params, "bytes": written,
                      "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    sys.exit(main())
