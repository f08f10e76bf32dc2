"""Shared helpers for ftune's Python oracle tests: locating the built binaries, running them, and
building tiny random transformers Llama models to compare against."""
import json
import os
import subprocess
from pathlib import Path

import torch

SOURCE_DIR = Path(os.environ.get("FTUNE_SOURCE_DIR", Path(__file__).resolve().parents[2]))


def ftune_bin() -> str:
    path = os.environ.get("FTUNE_BIN") or str(SOURCE_DIR / "build" / "bin" / "ftune")
    assert Path(path).exists(), f"ftune binary not found at {path}; build first"
    return path


def tool(name: str) -> str:
    d = os.environ.get("FTUNE_TOOLS_DIR") or str(Path(ftune_bin()).parent)
    path = Path(d) / name
    assert path.exists(), f"test tool {name} not found in {d}"
    return str(path)


def run(args, check=True, timeout=600, **kw):
    """Runs a command, returning CompletedProcess with text output; raises with output on failure."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def ftune(*args, **kw):
    return run([ftune_bin(), *args], **kw)


def tiny_llama(tmp: Path, seed=0, dtype=torch.float32, **overrides):
    """Saves a random transformers LlamaForCausalLM (tiny, fp32) to tmp and returns (model, path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    # transformers' default init has std 0.02, which makes logits nearly uniform; larger weights
    # make the comparison sensitive to every op.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(tmp, safe_serialization=True)
    return model, tmp


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj))
    return path
