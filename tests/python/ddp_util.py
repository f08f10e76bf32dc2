"""Helpers for the DDP tests (test_ddp.py): starting N `ftune train` processes as the ranks of one
run, the way torchrun and `ftune launch` do (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT=<a free port>), or through torchrun itself; collecting each
rank's exit code and output; and comparing a run's outputs with a one-process run's."""
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from ftune_testing import SOURCE_DIR, ftune, ftune_bin
from train_testing import CONFIG

# Variables a launcher sets; cleared so the test runner's own environment never leaks into a rank.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_RANK", "ROLE_RANK")
LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "TORCHELASTIC_")

# Every run: the tiny preset on the bundled alpaca sample, short rows, no validation file, fp32,
# one thread per rank (the machine has two cores), a configured peak (no matmul measurement),
# every step logged, no checkpoints unless a test asks.
BASE = ["data.seq_len=64", "data.valid=", "logging.peak_flops=1e10", "training.threads=1",
        "training.resume=none", "logging.log_every=1", "training.save_every=0",
        "parallel.timeout_s=60"]


# The sharded strategies' parity runs (test_zero.py, test_fsdp.py): 20 steps of grad_accum 2 at
# micro_batch 2 per rank, clipping active (full: weight decay too; LoRA: r 4 on every linear).
STEPS, ACCUM, MB = 20, 2, 2
FULL = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", "training.max_grad_norm=0.5",
        "training.weight_decay=0.1"]
# The LoRA runs' adapter: r 4 on every linear, lr 1e-2 (test_model_parallel, test_pipeline too).
ADAPTER = ["training.lr=1e-2", "lora.r=4", "lora.alpha=8",
           "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
LORA = [f"training.steps={STEPS}", f"training.grad_accum={ACCUM}", "training.max_grad_norm=0.05",
        *ADAPTER]


def tiny_model(tmp_path_factory, seed=7) -> Path:
    """An HF dir of the tiny preset (`ftune init-model`), for a module's runs."""
    d = tmp_path_factory.mktemp("models") / "tiny"
    ftune("init-model", "--preset", "tiny", "--out", d, "--seed", str(seed))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def rank_env(rank: int, world: int, port: int, **overrides) -> dict:
    """The environment of one rank on this node; overrides (None = unset) replace variables."""
    env = clean_env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                     "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port)})
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def train_args(out: Path, *sets, config=CONFIG):
    args = [ftune_bin(), "train", "--config", str(config), "--set", f"training.output_dir={out}"]
    for s in [*BASE, *sets]:
        args += ["--set", s]
    return args


@dataclass
class RankResult:
    rank: int
    rc: int
    stdout: str
    stderr: str
    seconds: float  # from start to exit

    def error_lines(self):
        return [l for l in self.stderr.splitlines() if l.startswith("ftune: error:")]


class Ranks:
    """N ftune processes started together; their output goes to files (no pipe can fill up and
    block a rank). Use as a context manager: whatever is still running at the end is killed."""

    def __init__(self, args_of_rank, env_of_rank, logs: Path, world: int):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.t0 = time.monotonic()
        self.procs, self.files, self.ended = [], [], {}
        for r in range(world):
            out = open(logs / f"rank{r}.stdout", "w+")
            err = open(logs / f"rank{r}.stderr", "w+")
            self.files.append((out, err))
            self.procs.append(subprocess.Popen([str(a) for a in args_of_rank(r)],
                                               env=env_of_rank(r), cwd=SOURCE_DIR, stdout=out,
                                               stderr=err, text=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        for out, err in self.files:
            out.close()
            err.close()

    def stderr(self, r: int) -> str:
        return (self.logs / f"rank{r}.stderr").read_text()

    def poll(self, r: int):
        """Exit code of rank r (None while running); records when it was first seen ended."""
        rc = self.procs[r].poll()
        if rc is not None and r not in self.ended:
            self.ended[r] = time.monotonic() - self.t0
        return rc

    def wait(self, timeout: float, ranks=None):
        """Waits for the ranks (all by default) to exit; on timeout kills every rank and fails
        with their output. Returns a RankResult per rank waited for."""
        ranks = list(range(len(self.procs))) if ranks is None else ranks
        deadline = time.monotonic() + timeout
        while any(self.poll(r) is None for r in ranks):
            if time.monotonic() > deadline:
                self.kill_all()
                raise AssertionError(f"ranks still running after {timeout} s:\n" + self.report())
            time.sleep(0.05)
        return [self.result(r) for r in ranks]

    def result(self, r: int) -> RankResult:
        return RankResult(r, self.procs[r].returncode, (self.logs / f"rank{r}.stdout").read_text(),
                          self.stderr(r), self.ended.get(r, time.monotonic() - self.t0))

    def report(self) -> str:
        return "\n".join(f"--- rank {r} (rc {p.poll()}):\n{self.stderr(r)[-3000:]}"
                         for r, p in enumerate(self.procs))


def start_ranks(out: Path, world: int, *sets, port=None, env_of_rank=None, args_of_rank=None):
    """Starts `world` ranks of `ftune train` writing to `out` (logs beside it, in out.logs/)."""
    port = port or free_port()
    args_of_rank = args_of_rank or (lambda r: train_args(out, *sets))
    env_of_rank = env_of_rank or (lambda r: rank_env(r, world, port))
    return Ranks(args_of_rank, env_of_rank, out.parent / (out.name + ".logs"), world)


def ddp_train(out: Path, world: int, *sets, timeout=180, check=True, **kw):
    """A whole DDP run; returns the RankResults (checked: every rank exited 0)."""
    with start_ranks(out, world, *sets, **kw) as ranks:
        res = ranks.wait(timeout)
        if check and any(r.rc != 0 for r in res):
            raise AssertionError(f"DDP run {out} failed:\n" + ranks.report())
    return res


def killed_in_collective(out: Path, collective: str, *sets):
    """Two ranks with parallel.timeout_s 5, rank 1 killed (SIGKILL, through the
    FTUNE_TEST_KILL_AT seam) as it enters `collective` at its first step. Checks that rank 1 died
    of the signal and rank 0 exited 1 with exactly one error line; returns (that line, seconds
    the run took, start-up included)."""
    port = free_port()
    env_of = lambda r: rank_env(r, 2, port, FTUNE_TEST_KILL_AT=f"1:{collective}")  # noqa: E731
    t0 = time.monotonic()
    with start_ranks(out, 2, *sets, "parallel.timeout_s=5", port=port,
                     env_of_rank=env_of) as ranks:
        res = ranks.wait(60)
    took = time.monotonic() - t0
    assert res[1].rc == 128 + 9 or res[1].rc == -9, res[1].rc
    lines = res[0].error_lines()
    assert res[0].rc == 1 and len(lines) == 1, res[0].stderr[-3000:]
    return lines[0], took


def single_train(out: Path, *sets, check=True, timeout=180):
    """The one-process oracle: the same run with no launcher variables."""
    return ftune(*train_args(out, *sets)[1:], check=check, cwd=SOURCE_DIR, env=clean_env(),
                 timeout=timeout)


def torchrun_train(out: Path, world: int, *sets, timeout=180):
    """The run through torchrun's rendezvous (--no-python: the ranks are ftune itself)."""
    torchrun = Path(SOURCE_DIR) / ".venv" / "bin" / "torchrun"
    args = [str(torchrun), "--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--no-python", *train_args(out, *sets)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=SOURCE_DIR,
                       env=clean_env())
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-5000:]}"
    return p


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def max_rel(a, b, key) -> float:
    """Max relative difference of metrics `key` over the steps; the step lists must match."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    return max(rel(x[key], y[key]) for x, y in zip(a, b))


def tensors_max_rel(a: Path, b: Path) -> float:
    """Max over tensors of |a - b| / |b| (Frobenius norms) between two safetensors files with the
    same names and shapes."""
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    worst = 0.0
    for k in tb:
        assert ta[k].shape == tb[k].shape, k
        x, y = ta[k].double(), tb[k].double()
        worst = max(worst, ((x - y).norm() / y.norm().clamp_min(1e-30)).item())
    return worst


def numel(path: Path) -> int:
    return sum(t.numel() for t in load_file(path).values())


def weight_file(final: Path) -> Path:
    """final/model.safetensors, or final/adapter_model.safetensors for a LoRA run."""
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (final / name).exists():
            return final / name
    raise AssertionError(f"no weights in {final}: {sorted(p.name for p in final.iterdir())}")


def tiny_models(d: Path) -> dict:
    """model.path of each kind: the tiny preset itself (each rank builds it from the seed, rank 0
    writes base/), an HF dir of it (untied) and the same shape with tied embeddings."""
    ftune("init-model", "--preset", "tiny", "--out", d / "untied", "--seed", "5")
    cfg = json.loads((d / "untied" / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "tied.json").write_text(json.dumps(cfg))
    ftune("init-model", "--config", d / "tied.json", "--out", d / "tied", "--seed", "5")
    assert "lm_head.weight" not in load_file(d / "tied" / "model.safetensors")
    assert "lm_head.weight" in load_file(d / "untied" / "model.safetensors")
    return {"preset": "preset:tiny", "untied": d / "untied", "tied": d / "tied"}
