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


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected 0x82F63B78), bytewise: the oracle for checksums.json."""
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    c = 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ table[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def edit_checkpoint_file(ck: Path, name: str, text: str):
    """Writes checkpoint file ck/name and updates its checksums.json entry to match: a deliberate
    edit (which the content checks must still catch), not damage."""
    (ck / name).write_text(text)
    sums = json.loads((ck / "checksums.json").read_text())
    data = (ck / name).read_bytes()
    sums["files"][name] = {"size": len(data), "crc32c": f"{crc32c(data):08x}"}
    (ck / "checksums.json").write_text(json.dumps(sums))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def replay_step(model, batch_dir: Path, step: int, device="cpu", autocast=False):
    """Forward + backward of the micro-batches ftune dumped for `step` (training.dump_batches)
    through a transformers model, the loss normalized by the target tokens of the whole
    accumulated batch as ftune does. Returns (mean loss, target tokens). `device` is where the
    model is (the batches go there); `autocast` runs the forward under torch.autocast(bf16), the
    peer of ftune's model.dtype bf16."""
    import contextlib

    import torch
    from safetensors.torch import load_file

    t = load_file(batch_dir / f"step-{step}.safetensors", device=str(device))
    n_micro = len([k for k in t if k.endswith(".input_ids")])
    micro = [{k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(f"mb{i}.")}
             for i in range(n_micro)]
    total = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    loss_sum = 0.0
    dev_type = torch.device(device).type
    for m in micro:
        with (torch.autocast(dev_type, dtype=torch.bfloat16) if autocast
              else contextlib.nullcontext()):
            logits = model(input_ids=m["input_ids"], position_ids=m["positions"],
                           attention_mask=m["attn_mask"].bool()).logits
        V = logits.shape[-1]
        ls = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, V), m["labels"][:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum")
        (ls / float(max(total, 1))).backward()
        loss_sum += ls.item()
    return loss_sum / max(total, 1), total
