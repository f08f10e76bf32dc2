"""File faults during training (issue #12 item 3). A file-size limit (`ulimit -f`, RLIMIT_FSIZE)
and a full disk (a small tmpfs; skipped where this process may not mount one) hit while a
checkpoint is written, and then while the final model is written: each ends the run with one
error line naming the file (not a SIGXFSZ kill), the failed write leaves no temp dir behind, the
previous checkpoint stays the latest complete one, and the same command with room again resumes
from it to the uninterrupted run's losses and final weights, bit for bit."""
import os
import resource
import subprocess

import pytest
from safetensors.torch import load_file

from ddp_util import clean_env, single_train, train_args
from ftune_testing import SOURCE_DIR, ftune
from train_testing import metrics

SETS = ["training.steps=8", "training.grad_accum=2", "training.micro_batch=2",
        "training.save_every=2", "training.resume=auto"]


@pytest.fixture(scope="module")
def model_and_whole(tmp_path_factory):
    """An HF model dir (a preset would write its base weights into output_dir at every start) and
    the uninterrupted run."""
    root = tmp_path_factory.mktemp("runs")
    model = root / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", model, "--seed", "7")
    sets = [*SETS, f"model.path={model}"]
    single_train(root / "whole", *sets)
    return sets, root / "whole"


def failing_run(out, *sets, preexec_fn=None):
    """A run expected to fail on a write: returns its one error line."""
    p = subprocess.run([str(a) for a in train_args(out, *sets)], cwd=SOURCE_DIR, env=clean_env(),
                       capture_output=True, text=True, timeout=180, preexec_fn=preexec_fn)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    errors = [l for l in p.stderr.splitlines() if l.startswith("ftune: error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    return errors[0]


def entries(d):
    return sorted(e.name for e in d.iterdir())


def assert_same_run(out, whole):
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(whole)]
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(whole / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_file_size_limit_during_a_checkpoint_and_the_final_write(model_and_whole, tmp_path):
    sets, whole = model_and_whole
    out = tmp_path / "run"
    single_train(out, *sets, "training.stop_after=4")

    def limit():  # 200 KiB: the run's logs fit, a checkpoint's 0.5 MB weights do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    error = failing_run(out, *sets, preexec_fn=limit)
    assert "checkpoints/.tmp-step-6" in error and "File too large" in error, error
    assert entries(out / "checkpoints") == ["step-2", "step-4"]
    # No checkpoint before the end: the final model's write hits the limit.
    error = failing_run(out, *sets, "training.save_every=0", preexec_fn=limit)
    assert f"{out}/.tmp-final-" in error and "File too large" in error, error
    assert entries(out / "checkpoints") == ["step-2", "step-4"]
    assert not (out / "final").exists() and not any(e.startswith(".") for e in entries(out))
    single_train(out, *sets)  # no limit: resumes from step 4
    assert_same_run(out, whole)


def used_bytes(path):
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_disk_during_a_checkpoint_and_the_final_write(model_and_whole, tmp_path):
    sets, whole = model_and_whole
    disk = tmp_path / "disk"
    disk.mkdir()
    # A checkpoint's size in tmpfs pages: the disk holds one and its logs, not two.
    ck = whole / "checkpoints" / "step-8"
    one = sum(-(-f.stat().st_size // 4096) * 4096 for f in ck.iterdir())

    def mount(*opts):
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(disk)],
                              capture_output=True, text=True)

    p = mount(f"size={one * 3 // 2 + 256 * 1024}")
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}); the file-size limit test "
                    "covers the same writes")
    try:
        out = disk / "run"
        error = failing_run(out, *sets, "training.keep_last=1")
        assert "checkpoints/.tmp-step-4" in error and "No space left on device" in error, error
        assert entries(out / "checkpoints") == ["step-2"]  # the failed write took its temp away
        # Room for the logs but not the final model (0.5 MB), and no checkpoint before the end.
        assert mount("remount", f"size={used_bytes(disk) + 128 * 1024}").returncode == 0
        error = failing_run(out, *sets, "training.keep_last=1", "training.save_every=0")
        assert f"{out}/.tmp-final-" in error and "No space left on device" in error, error
        assert entries(out / "checkpoints") == ["step-2"]
        assert not (out / "final").exists() and not any(e.startswith(".") for e in entries(out))
        assert mount("remount", "size=64m").returncode == 0
        single_train(out, *sets)  # resumes from step 2
        assert_same_run(out, whole)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
