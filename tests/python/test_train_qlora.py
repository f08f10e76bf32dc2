"""QLoRA in `ftune train`: LoRA on a frozen NF4 base, against transformers + PEFT + bitsandbytes
(on CPU) on the tiny preset's shape. Both sides read the same 4-bit checkpoint that `ftune
quantize` wrote (bitsandbytes' layout, double quantization, compute dtype fp32), and transformers
loads it as bitsandbytes' Linear4bit.

- Parity: 12 steps replayed from ftune's dumped batches and initial adapter: losses and grad norms
  within 1e-5 relative, the final adapter too.
- Resume after stop_after is bit-exact against an uninterrupted run (quantized at load).
- `ftune merge` of the QLoRA adapter equals the oracle: bitsandbytes' dequantized base with PEFT's
  merge_and_unload, and ftune's unmerged eval of the adapter on the 4-bit base.
- A 4-bit checkpoint without a lora section is refused in one line.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune_testing import ftune
from test_train_lora import LORA, peft_reference
from train_testing import metrics, one_error_line, rel, train


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> tuple[Path, Path]:
    """(dense tiny model, its NF4 quantization with compute dtype fp32)."""
    root = tmp_path_factory.mktemp("qbase")
    dense, q4 = root / "tiny", root / "tiny-nf4"
    ftune("init-model", "--preset", "tiny", "--out", dense, "--seed", "5")
    ftune("quantize", "--model", dense, "--out", q4, "--compute-dtype", "fp32")
    return dense, q4


def test_qlora_matches_peft_bitsandbytes_loop(tmp_path, bases):
    _, q4 = bases
    steps, lr, warmup, wd, max_norm = 12, 1e-2, 2, 0.0, 0.5
    out = tmp_path / "run"
    train(out, f"model.path={q4}", *LORA, "quant.compute_dtype=fp32", f"training.steps={steps}",
          "training.micro_batch=2", f"training.lr={lr}", f"training.warmup_steps={warmup}",
          f"training.weight_decay={wd}", f"training.max_grad_norm={max_norm}",
          "training.dump_batches=true", "logging.log_every=1")
    got = metrics(out)
    peft_model, ref = peft_reference(q4, out / "batches" / "initial_adapter", out / "batches",
                                     steps, lr=lr, warmup=warmup, wd=wd, max_norm=max_norm)
    import bitsandbytes as bnb
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules())
    assert n4 == 14, "transformers must load the base as bitsandbytes 4-bit linears"
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        assert g["target_tokens"] == r["targets"]
        worst = max(worst, rel(g["loss"], r["loss"]), rel(g["grad_norm"], r["grad_norm"]))
    print(f"\nQLoRA vs PEFT+bitsandbytes: worst relative difference {worst:.2e}")
    assert worst < 1e-5, worst
    assert got[-1]["loss"] < got[0]["loss"] - 0.1, "the adapters should learn"
    mine = load_file(out / "final" / "adapter_model.safetensors")
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    for k, v in mine.items():
        ref_v = theirs[k.replace(".weight", ".default.weight")]
        assert ((v - ref_v).norm() / ref_v.norm().clamp_min(1e-12)).item() < 1e-5, k


def test_qlora_resume_is_bit_exact(tmp_path, bases):
    dense, _ = bases
    sets = [f"model.path={dense}", *LORA, "quant.compute_dtype=fp32", "training.steps=6",
            "training.micro_batch=2", "training.lr=1e-2", "lora.dropout=0.1", "logging.log_every=1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(whole, *sets)
    train(part, *sets, "training.stop_after=3")
    train(part, *sets, resume="auto")
    for a, b in zip(metrics(whole), metrics(part), strict=True):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    wa = load_file(whole / "final" / "adapter_model.safetensors")
    wb = load_file(part / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_merge_of_a_qlora_adapter(tmp_path, bases):
    """merge dequantizes the 4-bit base and adds the adapter: equal to PEFT's merge_and_unload
    onto bitsandbytes' dequantization of the same checkpoint."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, q4 = bases
    out = tmp_path / "run"
    train(out, f"model.path={q4}", *LORA, "quant.compute_dtype=fp32", "training.steps=4",
          "training.micro_batch=2", "training.lr=1e-2")
    merged = tmp_path / "merged"
    ftune("merge", "--model", q4, "--adapter", out / "final", "--out", merged)
    # The oracle's dense base: every Linear4bit dequantized by bitsandbytes.
    qm = LlamaForCausalLM.from_pretrained(q4, dtype=torch.float32)
    dense = LlamaForCausalLM(qm.config).eval()
    state = {}
    for name, mod in qm.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            state[name + ".weight"] = w.float()
    for name, p in qm.named_parameters():
        if name not in state and "weight" in name and p.dtype.is_floating_point:
            state[name] = p.detach().float()
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    oracle = PeftModel.from_pretrained(dense, out / "final").merge_and_unload().eval()
    ours = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.randint(0, qm.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, oracle(input_ids=ids).logits
    d = ((a - b).norm() / b.norm()).item()
    print(f"\nmerged QLoRA vs bitsandbytes dequant + PEFT merge: {d:.2e}")
    assert d < 1e-5, d


def test_full_finetuning_of_a_4bit_checkpoint_is_refused(tmp_path, bases):
    _, q4 = bases
    out = tmp_path / "run"
    line = one_error_line(train(out, f"model.path={q4}", check=False))
    assert "model.path:" in line and "4-bit" in line and "lora" in line, line
