"""Helpers shared by the `ftune train` tests (test_train.py, test_train_inputs.py): running a
short training of the tiny preset on the bundled sample data, and reading its outputs."""
import json
import shutil
from pathlib import Path

from ftune_testing import SOURCE_DIR, ftune

CONFIG = SOURCE_DIR / "configs" / "tiny_full.yaml"
# Small rows and no validation file unless a test needs them: each run takes a few seconds.
FAST = ["logging.peak_flops=1e10", "training.threads=2", "data.seq_len=128", "data.valid=",
        "training.resume=none"]


def train(out: Path, *sets, check=True, env=None, resume="none"):
    args = ["train", "--config", CONFIG, "--set", f"training.output_dir={out}"]
    for s in [*FAST[:-1], f"training.resume={resume}", *sets]:
        args += ["--set", s]
    return ftune(*args, check=check, cwd=SOURCE_DIR, env=env, timeout=300)


def metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def one_error_line(p):
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ftune: error: "), lines[0]
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
