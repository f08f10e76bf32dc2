"""`ftune train` with a `lora` section, against transformers + PEFT, on the tiny preset's shape and
the bundled alpaca sample data (packed rows, loss on the responses only).

- Parity: 20 steps of LoRA (fp32, dropout 0, weight decay and clipping on) equal a plain
  transformers + PEFT loop fed the batches ftune dumped, starting from the initial adapter ftune
  wrote beside them (training.dump_batches), with and without activation checkpointing: per step
  loss and grad norm, and the final adapter. A base that moved (decay on frozen weights, a
  gradient reaching it) would drift the losses from the step it moved on.
- final/ is a PEFT adapter dir (PEFT loads it); the base model files are untouched; checkpoints
  hold the adapter, and optimizer.safetensors holds state for the adapters only.
- Resume after stop_after is bit-exact against an uninterrupted run.
- A bf16 base is held in bf16 (the reported frozen-base bytes are 2 per parameter), adapters fp32;
  chat data with padded rows and activation checkpointing trains.
- Config errors are one line naming the key, and nothing is written.
"""
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune_testing import SOURCE_DIR, ftune
from train_testing import metrics, one_error_line, rel, replay_step, train

LORA = ["lora.r=4", "lora.alpha=8", "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,"
        "up_proj,down_proj]"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny preset as an HF model dir (with its tokenizer), so the run reads a base it must
    not modify."""
    d = tmp_path_factory.mktemp("base") / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", d, "--seed", "3")
    return d


def peft_reference(base: Path, adapter: Path, batch_dir: Path, steps: int, *, lr, warmup, wd,
                   max_norm, device="cpu"):
    """Replays ftune's dumped batches through transformers + PEFT from ftune's initial adapter,
    on `device` (a bitsandbytes 4-bit base is placed there at load, as device_map does)."""
    import transformers
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    placed = {} if device == "cpu" else {"device_map": {"": device}}
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa",
                                             **placed)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=True)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, steps)
    out = []
    for step in range(1, steps + 1):
        loss, total = replay_step(model, batch_dir, step, device)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": loss, "grad_norm": norm.item(), "targets": total})
    return model, out


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_lora_matches_peft_loop(tmp_path, base, checkpointing):
    steps, lr, warmup, wd, max_norm = 20, 1e-2, 3, 0.1, 0.5
    base_files = {p.name: sha(p) for p in base.iterdir()}
    out = tmp_path / "run"
    p = train(out, f"model.path={base}", *LORA, f"training.steps={steps}",
              "training.micro_batch=2", "training.grad_accum=2", f"training.lr={lr}",
              f"training.warmup_steps={warmup}", f"training.weight_decay={wd}",
              f"training.max_grad_norm={max_norm}", "training.dump_batches=true",
              f"model.grad_checkpointing={checkpointing}", "logging.log_every=1",
              "training.save_every=10")
    got = metrics(out)
    assert [m["step"] for m in got] == list(range(1, steps + 1))
    peft_model, ref = peft_reference(base, out / "batches" / "initial_adapter",
                                     out / "batches", steps, lr=lr, warmup=warmup, wd=wd,
                                     max_norm=max_norm)
    worst = 0.0
    clipped = 0
    for g, r in zip(got, ref):
        assert g["target_tokens"] == r["targets"]
        worst = max(worst, rel(g["loss"], r["loss"]), rel(g["grad_norm"], r["grad_norm"]))
        clipped += r["grad_norm"] > max_norm
    print(f"\nLoRA vs PEFT, checkpointing {checkpointing}: worst relative difference {worst:.2e}")
    assert worst < 1e-5, worst
    assert clipped >= 1, "clipping should be active in this test"
    assert got[-1]["loss"] < got[0]["loss"] - 0.1, "the adapters should learn"

    # final/ is a PEFT adapter dir with the tokenizer, naming the base; no base weights in it.
    final = out / "final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names, names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names), names
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    mine = load_file(final / "adapter_model.safetensors")
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(mine) == len(theirs) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    worst_w = 0.0
    for k, v in mine.items():
        ref_v = theirs[k.replace(".weight", ".default.weight")]
        d = ((v - ref_v).norm() / ref_v.norm().clamp_min(1e-12)).item()
        worst_w = max(worst_w, d)
        assert d < 1e-5, (k, d)
    print(f"final adapter vs PEFT: worst relative difference {worst_w:.2e}")
    # PEFT loads final/ onto the base and computes what the trained reference computes.
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), final).eval()
    peft_model.eval()
    ids = load_file(out / "batches" / "step-1.safetensors")["mb0.input_ids"]
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    # The base dir is byte for byte what it was.
    assert {p.name: sha(p) for p in base.iterdir()} == base_files

    # Checkpoints hold the adapter and optimizer state for the adapters only.
    ck = out / "checkpoints" / "step-20"
    assert (ck / "adapter_model.safetensors").exists() and not (ck / "model.safetensors").exists()
    opt_keys = set(load_file(ck / "optimizer.safetensors"))
    assert opt_keys == {f"{k[len('base_model.model.'):]}.{s}" for k in mine
                        for s in ("exp_avg", "exp_avg_sq", "step")}

    # The reported counts are the adapters' and the base's.
    n_adapter = sum(v.numel() for v in mine.values())
    n_base = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(base).parameters())
    line = f"parameters: {n_adapter} trainable of {n_adapter + n_base} "
    assert line in p.stderr and line in p.stdout, (p.stderr, p.stdout)
    assert f"frozen base {n_base * 4 / 1e6:.2f} MB" in p.stdout
    assert f"optimizer state {n_adapter * 8 / 1e6 + len(mine) * 8 / 1e6:.2f} MB" in p.stdout


RESUME = [*LORA, "training.steps=8", "training.micro_batch=2", "logging.log_every=1",
          "training.lr=1e-2", "lora.dropout=0.1"]


def test_resume_is_bit_exact(tmp_path, base):
    # Dropout on: the RNG state has to come back too.
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(whole, f"model.path={base}", *RESUME)
    p = train(part, f"model.path={base}", *RESUME, "training.stop_after=4")
    assert "stopped: 4/8 steps" in p.stdout and not (part / "final").exists()
    ck = part / "checkpoints" / "step-4"
    assert (ck / "adapter_config.json").exists() and not (ck / "model.safetensors").exists()
    p = train(part, f"model.path={base}", *RESUME, resume="auto")
    assert "resuming from" in p.stderr
    for a, b in zip(metrics(whole), metrics(part)):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    wa = load_file(whole / "final" / "adapter_model.safetensors")
    wb = load_file(part / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Changing the rank is another run: refused, naming the key.
    line = one_error_line(train(part, f"model.path={base}", *RESUME, "lora.r=8",
                                "training.steps=10", check=False, resume="auto"))
    assert "lora.r: the config differs from the one of checkpoint" in line and "4 -> 8" in line


def test_bf16_base_preset_chat_and_padding(tmp_path):
    """A bf16 LoRA run on a preset, chat data (loss on the assistant turns), one conversation a
    padded row, activation checkpointing: the frozen base is held in bf16 (2 bytes a parameter,
    as reported), the adapters in fp32, and it learns."""
    out = tmp_path / "run"
    p = train(out, "model.dtype=bf16", "lora.targets=all-linear", "lora.r=8",
              "training.steps=12", "training.micro_batch=2", "training.lr=1e-2",
              "data.train=data/sample_chat.jsonl", "data.format=chat",
              "model.grad_checkpointing=true", "data.packing=false", "data.seq_len=256",
              "logging.log_every=1")
    got = metrics(out)
    assert got[-1]["loss"] < got[0]["loss"], [m["loss"] for m in got]
    m = re.search(r"parameters: (\d+) trainable of (\d+) .*frozen base ([\d.]+) MB, trainable "
                  r"([\d.]+) MB", p.stdout)
    assert m, p.stdout
    trainable, total = int(m[1]), int(m[2])
    assert float(m[3]) == round((total - trainable) * 2 / 1e6, 2), m[0]
    assert float(m[4]) == round(trainable * 4 / 1e6, 2), m[0]
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert sum(v.numel() for v in adapter.values()) == trainable
    assert all(v.dtype == torch.float32 for v in adapter.values())


@pytest.mark.parametrize("sets,where", [
    (["quant.type=nf4"], "quant: needs a lora section"),
    (["lora.r=8", "quant.type=fp4"], "--set quant.type=fp4: quant.type: expected one of nf4, got "
                                     "\"fp4\""),
    (["lora.targets=[c_attn]"], "--set lora.targets=[c_attn]: lora.targets: unknown module "
                                "'c_attn'"),
    (["lora.r=0"], "--set lora.r=0: lora.r: expected a positive rank, got 0"),
    (["lora.r=4096"], "--set lora.r=4096: lora.r: 4096 exceeds the smallest dimension"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, sets, where):
    out = tmp_path / "run"
    line = one_error_line(train(out, *sets, check=False))
    assert where in line, line
    assert not out.exists()


@pytest.mark.parametrize("recipe", ["smollm2_lora", "smollm2_qlora", "tinyllama_qlora",
                                    "smollm2_qlora_fsdp", "codellama_fsdp"])
def test_recipes_are_valid_configs(tmp_path, recipe):
    """Every key of the recipes is accepted and valid: the first error is the placeholder model
    path, which is checked after the whole config."""
    p = ftune("train", "--config", f"configs/{recipe}.yaml", "--set", "model.path=/nonexistent/m",
              "--set", f"training.output_dir={tmp_path / 'run'}", check=False, cwd=SOURCE_DIR)
    line = one_error_line(p)
    assert "model.path: /nonexistent/m: no such directory" in line, line


def test_lora_recipe_trains_on_a_preset(tmp_path):
    """configs/smollm2_lora.yaml as is (bf16 base, r 16 on every linear, dropout), on the tiny
    preset's shape for a few steps."""
    out = tmp_path / "run"
    p = ftune("train", "--config", "configs/smollm2_lora.yaml", "--set", "model.path=preset:tiny",
              "--set", f"training.output_dir={out}", "--set", "training.steps=3",
              "--set", "data.seq_len=128", "--set", "logging.peak_flops=1e10",
              "--set", "training.threads=2", "--set", "training.eval_at_start=false",
              "--set", "data.valid=", cwd=SOURCE_DIR)
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["lora_dropout"] == 0.05
    assert len(cfg["target_modules"]) == 7
    assert "adapter: " in p.stdout
