"""The target-only chunked loss (model::chunked_lm_loss_sum, the training and eval path) against
the plain path: transformers' full logits + torch cross_entropy (shifted, ignore_index -100, sum).

- Values and every weight gradient on tiny random models, tied and untied, with response-only
  labels (-100 on a prompt), right padding (-100, pad ids) and a row without any target, over
  several chunks (--chunk 7) and the default chunk; backward of 0.37 * sum (grad_out != 1).
- A frozen head (LoRA freezes lm_head / the tied embedding): no gradient for it, the rest equal.
- No target at all: loss 0, count 0, zero gradients.
- bf16 autocast: close to ftune's plain bf16 path (bf16 rounding).
- Peak memory of one forward + backward on a 32k-vocabulary tiny model (loss_tool memory, peak RSS
  above the pre-step RSS): the chunked path needs far less than the full logits.
Measured (CPU, 2 threads): fp32 loss and gradients within ~1e-7 relative (bound 1e-6).
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ftune_testing import rel_err, run, tiny_llama, tool

FP32 = 1e-6
BF16 = 3e-2
SCALE = 0.37  # loss_tool backpropagates SCALE * sum


def _batch(vocab, B=3, T=40, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :11] = -100           # response-only: a prompt of 11 tokens
    ids[1, 29:] = 0                 # right padding
    labels[1, 29:] = -100
    labels[1, :5] = -100
    labels[2, :] = -100             # a row without any target
    labels[2, 17] = ids[2, 17]      # ... but one
    return ids, labels


def _ftune(path, ids, labels, tmp, *extra):
    b = tmp / "batch.safetensors"
    save_file({"input_ids": ids.contiguous(), "labels": labels.contiguous()}, str(b))
    out = tmp / "out.safetensors"
    run([tool("loss_tool"), "grad", "--model", path, "--batch", b, "--out", out, *extra])
    return load_file(out)


def _reference(model, ids, labels, freeze_head=False):
    model.zero_grad(set_to_none=True)
    head = model.get_output_embeddings().weight
    head.requires_grad_(not freeze_head)
    logits = model(input_ids=ids).logits
    V = logits.shape[-1]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")
    (SCALE * loss).backward()
    head.requires_grad_(True)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int((labels[:, 1:] != -100).sum()), grads


def _compare(out, ref, bound):
    loss, count, grads = ref
    assert int(out["count"][0]) == count
    errs = {"loss": rel_err(out["loss"], loss.reshape(1))}
    got = {k[5:]: v for k, v in out.items() if k.startswith("grad.")}
    assert set(got) == set(grads), (sorted(got), sorted(grads))
    for name, g in grads.items():
        errs[name] = rel_err(got[name], g)
    worst = max(errs, key=errs.get)
    print(f"worst {worst}: {errs[worst]:.2e}, loss {errs['loss']:.2e}")
    assert errs[worst] < bound, (worst, errs[worst])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", ["7", "0"])
def test_matches_full_logits(tmp_path, tied, chunk):
    model, path = tiny_llama(tmp_path / "m", vocab_size=300, tie_word_embeddings=tied)
    ids, labels = _batch(300)
    out = _ftune(path, ids, labels, tmp_path, "--chunk", chunk)
    _compare(out, _reference(model, ids, labels), FP32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_frozen_head(tmp_path, tied):
    model, path = tiny_llama(tmp_path / "m", vocab_size=300, tie_word_embeddings=tied)
    ids, labels = _batch(300)
    out = _ftune(path, ids, labels, tmp_path, "--chunk", "5", "--freeze-head")
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert "grad." + head not in out
    _compare(out, _reference(model, ids, labels, freeze_head=True), FP32)


def test_no_targets(tmp_path):
    model, path = tiny_llama(tmp_path / "m", vocab_size=300)
    ids, _ = _batch(300)
    labels = torch.full_like(ids, -100)
    out = _ftune(path, ids, labels, tmp_path)
    assert int(out["count"][0]) == 0 and float(out["loss"][0]) == 0.0
    ref = _reference(model, ids, labels)
    assert float(ref[0]) == 0.0
    for k, v in out.items():
        if k.startswith("grad."):
            assert not v.any(), k


def test_bf16_autocast_close_to_plain(tmp_path):
    _, path = tiny_llama(tmp_path / "m", vocab_size=300)
    ids, labels = _batch(300)
    plain = _ftune(path, ids, labels, tmp_path, "--bf16", "--plain")
    chunked = _ftune(path, ids, labels, tmp_path, "--bf16", "--chunk", "7")
    assert int(plain["count"][0]) == int(chunked["count"][0])
    for k in plain:
        if k != "count":
            assert rel_err(chunked[k], plain[k]) < BF16, (k, rel_err(chunked[k], plain[k]))


def test_rejects_target_outside_vocabulary(tmp_path):
    _, path = tiny_llama(tmp_path / "m", vocab_size=300)
    ids, labels = _batch(300)
    labels[0, 20] = 300
    b = tmp_path / "batch.safetensors"
    save_file({"input_ids": ids, "labels": labels}, str(b))
    p = run([tool("loss_tool"), "grad", "--model", path, "--batch", b, "--out",
             tmp_path / "o.safetensors"], check=False)
    assert p.returncode == 1
    assert p.stderr.strip().endswith("loss: labels: target id 300 is outside the vocabulary [0, 300)")


def test_peak_memory_below_full_logits(tmp_path):
    # 32k vocabulary, 4 x 512 tokens: the plain path's fp32 logits alone are 262 MB.
    _, path = tiny_llama(tmp_path / "m", vocab_size=32000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, max_position_embeddings=512)
    got = {}
    for mode in ("plain", "chunked"):
        p = run([tool("loss_tool"), "memory", "--model", path, "--batch", "4", "--seq", "512",
                 *(["--plain"] if mode == "plain" else [])])
        got[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    mb = {k: v["peak_above"] / 2**20 for k, v in got.items()}
    print(f"peak above the pre-step RSS: plain {mb['plain']:.0f} MiB, chunked {mb['chunked']:.0f} MiB")
    assert abs(got["plain"]["loss"] - got["chunked"]["loss"]) < 1e-5 * abs(got["plain"]["loss"])
    logits_mb = 4 * 511 * 32000 * 4 / 2**20
    assert mb["plain"] > 2 * logits_mb   # logits + their softmax/gradient
    assert mb["chunked"] < 0.35 * mb["plain"], mb
