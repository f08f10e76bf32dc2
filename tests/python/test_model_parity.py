"""Logits and gradient parity of ftune's LlamaForCausalLM with transformers on random tiny
configs (GQA ratios, tied/untied embeddings, rope_theta, llama3 and linear rope scaling, odd
sizes), in fp32
and bf16, with and without activation checkpointing, plus re-save round trips."""
import pytest
import torch
from safetensors.torch import load_file

from ftune_testing import rel_err, run, tiny_llama, tool, write_json

CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa_theta": dict(num_attention_heads=6, num_key_value_heads=1, hidden_size=48,
                      rope_theta=500000.0),
    "llama3_scaling": dict(rope_theta=500000.0, max_position_embeddings=256,
                           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=16)),
    "linear_scaling": dict(max_position_embeddings=256,
                           rope_scaling=dict(rope_type="linear", factor=4.0)),
    "odd_sizes": dict(hidden_size=60, intermediate_size=77, num_attention_heads=5,
                      num_key_value_heads=5, vocab_size=101),
    "explicit_head_dim": dict(hidden_size=48, head_dim=16, num_attention_heads=4,
                              num_key_value_heads=2),
}


# Bounds a small factor above the errors measured on this suite (each test prints its own; CPU,
# OMP_NUM_THREADS=2): fp32 logits and worst weight gradient measure 0.0 (the same ops in the same
# order as transformers), the loss up to 9.4e-8 (a sum / count instead of a mean); checkpointing
# vs plain 0.0 (a deterministic replay); bf16 logits 1.0e-2 vs transformers' bf16 and 1.2e-2 vs
# its fp32 (ops fused differently, each rounded to 8 mantissa bits).
LOGITS_FP32 = 1e-6
LOSS_FP32 = 5e-7
GRAD_FP32 = 1e-6
CHECKPOINTING = 1e-7
LOGITS_BF16 = 2e-2
LOGITS_BF16_VS_FP32 = 3e-2


def _ids(vocab, batch=2, seq=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _ftune_forward(model_dir, ids, tmp, *extra):
    out = tmp / "out.safetensors"
    run([tool("model_tool"), "--model", model_dir, "--ids", write_json(tmp / "ids.json", ids.tolist()),
         "--out", out, *extra])
    return load_file(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_and_grads(tmp_path, name):
    model, path = tiny_llama(tmp_path / "m", **CONFIGS[name])
    ids = _ids(model.config.vocab_size, seq=150 if "scaling" in name else 37)
    out = _ftune_forward(path, ids, tmp_path, "--grad")
    ref = model(ids, labels=ids)
    logits_err = rel_err(out["logits"], ref.logits.detach())
    loss_err = abs(out["loss"].item() - ref.loss.item()) / ref.loss.item()
    ref.loss.backward()
    grad_err = max(rel_err(out["grad." + pname], p.grad) for pname, p in model.named_parameters()
                   # tied: lm_head is the embedding, checked under its own name
                   if not (name == "gqa2_tied" and pname == "lm_head.weight"))
    print(f"{name}: logits {logits_err:.2e}, loss {loss_err:.2e}, worst grad {grad_err:.2e}")
    assert logits_err < LOGITS_FP32 and loss_err < LOSS_FP32 and grad_err < GRAD_FP32


def test_grad_checkpointing_matches(tmp_path):
    model, path = tiny_llama(tmp_path / "m", **CONFIGS["gqa2_tied"])
    ids = _ids(model.config.vocab_size)
    plain = _ftune_forward(path, ids, tmp_path, "--grad")
    ckpt = _ftune_forward(path, ids, tmp_path, "--grad", "--checkpointing")
    assert set(plain) == set(ckpt)
    worst = max(rel_err(ckpt[k], plain[k]) for k in plain)
    print(f"checkpointing vs plain: worst {worst:.2e}")
    assert worst < CHECKPOINTING


def test_bf16_logits(tmp_path):
    # bf16 tolerance: both sides round every op to bf16 (8 mantissa bits) but may fuse differently
    # (SDPA kernels, GEMM blocking), so logits agree to a few bf16 ulps: relative error < 2e-2.
    model, path = tiny_llama(tmp_path / "m", dtype=torch.bfloat16, **CONFIGS["gqa2_tied"])
    ids = _ids(model.config.vocab_size)
    out = _ftune_forward(path, ids, tmp_path, "--dtype", "bf16")
    with torch.no_grad():
        ref = model(ids).logits.float()
    # and bf16 stays close to the fp32 model's answer
    model32 = model.float()
    with torch.no_grad():
        ref32 = model32(ids).logits
    err, err32 = rel_err(out["logits"], ref), rel_err(out["logits"], ref32)
    print(f"bf16 logits: vs transformers bf16 {err:.2e}, vs transformers fp32 {err32:.2e}")
    assert err < LOGITS_BF16 and err32 < LOGITS_BF16_VS_FP32


def test_resave_loads_in_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    model, path = tiny_llama(tmp_path / "m", **CONFIGS["llama3_scaling"])
    resaved = tmp_path / "resaved"
    # max_shard_bytes=200000 in model_tool forces the sharded layout with an index.json
    run([tool("model_tool"), "--model", path, "--save", resaved])
    assert (resaved / "model.safetensors.index.json").exists()
    loaded, info = LlamaForCausalLM.from_pretrained(resaved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
