"""File faults during training (issue #12 item 3, first part): a file-size limit (`ulimit -f`,
RLIMIT_FSIZE) hit while a checkpoint is written ends the run with one error line naming the file
(not a SIGXFSZ kill), the previous checkpoint stays the latest complete one, and the same command
without the limit resumes from it to the uninterrupted run's losses and final weights, bit for
bit."""
import resource
import subprocess

from safetensors.torch import load_file

from ddp_util import clean_env, single_train, train_args
from ftune_testing import SOURCE_DIR, ftune
from train_testing import metrics

SETS = ["training.steps=8", "training.grad_accum=2", "training.micro_batch=2",
        "training.save_every=2", "training.resume=auto"]


def test_file_size_limit_during_a_checkpoint(tmp_path):
    # An HF model dir (a preset would write its base weights into output_dir at every start).
    model = tmp_path / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", model, "--seed", "7")
    sets = [*SETS, f"model.path={model}"]
    whole = tmp_path / "whole"
    single_train(whole, *sets)
    out = tmp_path / "run"
    single_train(out, *sets, "training.stop_after=4")

    def limit():  # 200 KiB: the run's logs fit, a checkpoint's 0.5 MB weights do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    p = subprocess.run([str(a) for a in train_args(out, *sets)], cwd=SOURCE_DIR, env=clean_env(),
                       capture_output=True, text=True, timeout=180, preexec_fn=limit)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    errors = [l for l in p.stderr.splitlines() if l.startswith("ftune: error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    assert "checkpoints/.tmp-step-6" in errors[0] and "File too large" in errors[0], errors[0]
    done = sorted(d.name for d in (out / "checkpoints").iterdir() if not d.name.startswith("."))
    assert done == ["step-2", "step-4"], done
    single_train(out, *sets)  # no limit: resumes from step 4 (the temp dir is cleaned up)
    assert not any(d.name.startswith(".") for d in (out / "checkpoints").iterdir())
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(whole)]
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(whole / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
