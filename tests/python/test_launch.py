"""`ftune launch` with real worker processes (/bin/sh through --exec, and ftune itself): the
torchrun environment each rank sees, rank-prefixed output on both streams without torn lines,
fail-fast supervision (exit status and signal named, the others stopped, SIGKILL after the grace
period), SIGINT/SIGTERM forwarding, no survivor after the launcher is SIGKILLed (checked in /proc
by an environment marker every descendant inherits), --master-port 0, one-line flag errors, and
`ftune train --nproc 2` starting two ftune workers. About 15 s on two shared cores."""
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from ftune_testing import SOURCE_DIR, ftune_bin

ERROR = "ftune: error: "


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK")}
    env["FTUNE_TEST_MARKER"] = uuid.uuid4().hex
    env.update(extra)
    return env


def launch(*args, env=None, timeout=60, stdin_text=""):
    env = env or base_env()
    t0 = time.monotonic()
    p = subprocess.run([ftune_bin(), "launch", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, input=stdin_text)
    p.elapsed = time.monotonic() - t0
    p.marker = env["FTUNE_TEST_MARKER"]
    return p


def worker_pids(stderr):
    """{rank: pid} from the launcher's "launch: rank N pid P" lines."""
    return {int(r): int(p) for r, p in re.findall(r"(?m)^launch: rank (\d+) pid (\d+)$", stderr)}


def marked(marker):
    """Live (not zombie) processes whose environment holds the test's marker."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if f"FTUNE_TEST_MARKER={marker}".encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(d))
    return found


def survivors(marker, timeout=5):
    """marked(marker) once it is empty or after `timeout` s: a process killed a moment ago may
    still be on its way out (not yet a zombie) when the launcher returns."""
    deadline = time.monotonic() + timeout
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


class Running:
    """A launcher in the background whose output lines are collected as they come."""

    def __init__(self, *args, env=None):
        self.env = env or base_env()
        self.marker = self.env["FTUNE_TEST_MARKER"]
        self.proc = subprocess.Popen([ftune_bin(), "launch", *map(str, args)], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                        for s, l in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_for(self, lines, pattern, count, timeout=20):
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, x)) for x in list(lines)) < count:
            assert time.monotonic() < deadline, (pattern, self.out, self.err)
            time.sleep(0.02)

    def finish(self, timeout=20):
        rc = self.proc.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running():
    started = []

    def start(*args, **kw):
        started.append(Running(*args, **kw))
        return started[-1]

    yield start
    for r in started:
        r.kill()


ENV_PROBE = ('echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR '
             '$MASTER_PORT $OMP_NUM_THREADS ${TORCHELASTIC_USE_AGENT_STORE-unset}"')


def test_workers_get_torchrun_environment():
    env = base_env(RANK="7", TORCHELASTIC_USE_AGENT_STORE="True")
    p = launch("--nproc", 3, "--exec", "--", "sh", "-c", ENV_PROBE, env=env)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == [
        f"[rank {r}] {r} 3 {r} 3 0 127.0.0.1 29500 1 unset" for r in range(3)]
    assert p.stderr.count("OMP_NUM_THREADS is not set; setting it to 1") == 1
    assert sorted(worker_pids(p.stderr)) == [0, 1, 2]

    # Node 1 of 2: global ranks 2 and 3; a user's OMP_NUM_THREADS stays, without the note.
    env = base_env(OMP_NUM_THREADS="3")
    p = launch("--nproc", 2, "--nnodes", 2, "--node-rank", 1, "--master-addr", "10.1.2.3",
               "--master-port", 29999, "--exec", "--", "sh", "-c", ENV_PROBE, env=env)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == [
        f"[rank {2 + r}] {2 + r} 4 {r} 2 1 10.1.2.3 29999 3 unset" for r in range(2)]
    assert "OMP_NUM_THREADS" not in p.stderr
    assert sorted(worker_pids(p.stderr)) == [2, 3]

    # Workers read /dev/null, not the launcher's stdin.
    p = launch("--nproc", 2, "--exec", "--", "sh", "-c", 'echo "in: $(cat)"', stdin_text="hello\n")
    assert sorted(p.stdout.splitlines()) == ["[rank 0] in: ", "[rank 1] in: "], p.stderr


def test_output_is_prefixed_line_by_line_on_both_streams():
    n = 4000  # ~400 KB per worker and stream: many pipe buffers, lines split across reads
    script = (f'yes "$RANK {"x" * 96}" | head -n {n}; yes "e$RANK {"y" * 50}" | head -n {n} >&2; '
              'printf "tail $RANK"; printf "etail $RANK" >&2')
    p = launch("--nproc", 3, "--exec", "--", "sh", "-c", script)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert len(out) == 3 * (n + 1)
    for line in out:
        m = re.fullmatch(r"\[rank (\d)\] (\d) x{96}|\[rank (\d)\] tail (\d)", line)
        assert m and len(set(filter(None, m.groups()))) == 1, line
    for r in range(3):
        assert out.count(f"[rank {r}] {r} {'x' * 96}") == n
        assert f"[rank {r}] tail {r}" in out  # the unterminated last line, flushed at exit
    err = [x for x in p.stderr.splitlines() if x.startswith("[rank")]
    assert len(err) == 3 * (n + 1)
    for r in range(3):
        assert err.count(f"[rank {r}] e{r} {'y' * 50}") == n
        assert f"[rank {r}] etail {r}" in err


def test_failed_worker_stops_the_others_and_names_rank_and_status():
    # rank 0 runs sleep as a child of sh: stopping it must reach the whole process group
    p = launch("--nproc", 2, "--grace-s", 30, "--exec", "--", "sh", "-c",
               'if [ "$RANK" = 1 ]; then sleep 0.3; echo bye; exit 3; fi; sleep 100')
    pids = worker_pids(p.stderr)
    assert p.returncode == 3, p.stderr
    assert error_lines(p.stderr) == [
        f"{ERROR}launch: rank 1 (pid {pids[1]}) exited with status 3; "
        "stopped the other 1 worker(s)"]
    assert p.stderr.splitlines()[-1].startswith(ERROR)
    assert "[rank 1] bye" in p.stdout
    assert p.elapsed < 15, p.elapsed  # SIGTERM stopped rank 0 at once, not SIGKILL after 30 s
    assert survivors(p.marker) == []


def test_worker_killed_by_sigkill_is_named_and_a_stuck_worker_is_killed_after_grace():
    # rank 0 ignores SIGTERM, so the launcher must escalate to SIGKILL after --grace-s 1
    p = launch("--nproc", 2, "--grace-s", 1, "--exec", "--", "sh", "-c",
               'if [ "$RANK" = 1 ]; then sleep 0.3; kill -9 $$; fi; trap "" TERM; sleep 100')
    pids = worker_pids(p.stderr)
    assert p.returncode == 128 + 9, p.stderr
    assert error_lines(p.stderr) == [
        f"{ERROR}launch: rank 1 (pid {pids[1]}) was killed by signal 9 (SIGKILL); "
        "stopped the other 1 worker(s)"]
    assert (f"launch: rank 0 (pid {pids[0]}) still running 1 s after the stop signal; "
            "sending SIGKILL") in p.stderr
    assert 1 <= p.elapsed < 15, p.elapsed
    assert survivors(p.marker) == []


def test_all_workers_succeed_exit_zero_even_when_one_finishes_early():
    p = launch("--nproc", 2, "--exec", "--", "sh", "-c", 'if [ "$RANK" = 0 ]; then sleep 0.5; fi')
    assert p.returncode == 0, p.stderr
    assert error_lines(p.stderr) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_sets_exit_code(running, sig):
    name = sig.name[3:]
    r = running("--nproc", 2, "--exec", "--", "sh", "-c",
                f'trap "echo got {name} \\$RANK; exit 0" {name}; echo ready; sleep 100 & wait')
    r.wait_for(r.out, r"\] ready$", 2)
    r.proc.send_signal(sig)
    assert r.finish() == 128 + sig
    assert sorted(x for x in r.out if "got" in x) == [f"[rank {i}] got {name} {i}" for i in (0, 1)]
    assert f"launch: got {sig.name}; forwarding it to the 2 running worker(s)" in r.err
    assert survivors(r.marker) == []


def test_second_signal_kills_workers_that_ignore_the_first(running):
    r = running("--nproc", 2, "--grace-s", 60, "--exec", "--", "sh", "-c",
                'trap "" TERM; echo ready; sleep 100')
    r.wait_for(r.out, r"\] ready$", 2)
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    r.wait_for(r.err, "forwarding it to the 2 running worker", 1)
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish() == 143
    assert time.monotonic() - t0 < 15  # not the 60 s grace period
    assert "launch: got SIGTERM while stopping the workers; sending SIGKILL" in r.err
    assert survivors(r.marker) == []


def test_sigkilled_launcher_leaves_no_worker(running):
    r = running("--nproc", 3, "--exec", "--", "sleep", 100)
    r.wait_for(r.err, r"^launch: rank \d pid \d+$", 3)
    pids = worker_pids("\n".join(r.err))
    assert sorted(set(marked(r.marker)) - {r.proc.pid}) == sorted(pids.values())
    r.proc.kill()
    r.proc.wait()
    assert survivors(r.marker) == []


def test_master_port_zero_picks_a_free_port():
    p = launch("--nproc", 2, "--master-port", 0, "--exec", "--", "sh", "-c", 'echo "$MASTER_PORT"')
    assert p.returncode == 0, p.stderr
    ports = {line.split()[-1] for line in p.stdout.splitlines()}
    assert len(ports) == 1
    port = int(ports.pop())
    assert 0 < port < 65536 and port != 29500
    assert f"launch: --master-port 0: picked free port {port} on 127.0.0.1" in p.stderr
    with socket.socket() as s:  # still free: the launcher closed its probe socket
        s.bind(("127.0.0.1", port))


def test_ftune_workers_run_this_binary():
    p = launch("--nproc", 2, "--", "--version")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == ["[rank 0] ftune 0.1.0", "[rank 1] ftune 0.1.0"]


def test_flag_errors_are_one_line_and_start_nothing(tmp_path):
    sh = ["--exec", "--", "sh", "-c", "true"]
    cases = [
        (["--nproc", 0, *sh], 'launch: --nproc: expected an integer >= 1, got "0"'),
        (sh, "launch: --nproc: required (worker processes on this node)"),
        (["--nproc", 2, "--nnodes", 0, *sh], 'launch: --nnodes: expected an integer >= 1, got "0"'),
        (["--nproc", 2, "--nnodes", 2, "--node-rank", 2, *sh],
         "launch: --node-rank: expected an integer in [0, --nnodes) = [0, 2), got 2"),
        (["--nproc", 2, "--node-rank", -1, *sh],
         'launch: --node-rank: expected an integer >= 0, got "-1"'),
        (["--nproc", 2, "--master-port", 65536, *sh],
         "launch: --master-port: expected an integer in 0..65535 (0: pick a free port), "
         'got "65536"'),
        (["--nproc", 2, "--master-port", "x", *sh],
         'launch: --master-port: expected an integer in 0..65535 (0: pick a free port), got "x"'),
        (["--nproc", 2, "--nnodes", 2, "--master-port", 0, *sh],
         "launch: --master-port: 0 (pick a free port) works only with --nnodes 1; with 2 nodes "
         "the others could not learn the port, so give one"),
        (["--nproc", 2, "--master-addr", "", *sh],
         'launch: --master-addr: expected a host name or IP address, got ""'),
        (["--nproc", 2, "--master-addr", "192.0.2.1", "--master-port", 0, *sh],
         "launch: --master-port 0: cannot bind a port on --master-addr 192.0.2.1 (Cannot assign "
         "requested address)"),
        (["--nproc", 2, "--grace-s", -1, *sh],
         "launch: --grace-s: expected a number of seconds in 0..86400, got -1"),
        (["--nproc", 2], "launch: expected the worker command after -- (e.g. ftune launch "
                         "--nproc 2 -- train --config FILE)"),
        (["--nproc", 2, "--"], "launch: expected the worker command after -- (e.g. ftune launch "
                               "--nproc 2 -- train --config FILE)"),
        (["--nproc", 2, "sh"], "launch: expected the worker command after -- (e.g. ftune launch "
                               "--nproc 2 -- train --config FILE)"),
        (["--nproc", 2, "--exec", "--", tmp_path / "nope"],
         f"launch: --exec: {tmp_path / 'nope'}: not found (expected an executable file, or a "
         "program on PATH)"),
        (["--nproc", 2, "--exec", "--", "no-such-program-ftune"],
         "launch: --exec: no-such-program-ftune: not found (expected an executable file, or a "
         "program on PATH)"),
        (["--nproc", 2, "--frob", *sh], "launch: --frob: unknown option (see ftune launch --help)"),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:  # each case is mostly LibTorch's load time
        got = list(pool.map(lambda c: launch(*c[0]), cases))
    for (args, want), p in zip(cases, got):
        assert (p.returncode, p.stdout, p.stderr) == (1, "", ERROR + want + "\n"), args


CONFIG = SOURCE_DIR / "configs" / "tiny_full.yaml"


def test_train_nproc_is_launch_shorthand(tmp_path):
    # Workers are real `ftune train` processes: each reads the config and data and fails on the
    # same bad row, which the launcher reports as a worker failure.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{not json\n')
    env = base_env()
    p = subprocess.run(
        [ftune_bin(), "train", "--nproc", "2", "--config", CONFIG,
         "--set", f"data.train={bad}", "--set", f"training.output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=SOURCE_DIR)
    assert p.returncode == 1, p.stderr
    pids = worker_pids(p.stderr)
    assert sorted(pids) == [0, 1]
    assert re.search(r"(?m)^launch: --master-port 0: picked free port \d+ on 127\.0\.0\.1$",
                     p.stderr)
    assert re.search(rf"(?m)^\[rank [01]\] ftune: error: .*{re.escape(str(bad))}:2: ", p.stderr)
    [line] = error_lines(p.stderr)
    m = re.fullmatch(r"ftune: error: launch: rank ([01]) \(pid (\d+)\) exited with status 1.*",
                     line)
    assert m and pids[int(m.group(1))] == int(m.group(2)), line
    assert survivors(env["FTUNE_TEST_MARKER"]) == []


def test_train_nproc_errors(tmp_path):
    p = subprocess.run([ftune_bin(), "train", "--nproc", "2", "--config", CONFIG],
                       capture_output=True, text=True, timeout=60, env=base_env(RANK="1"))
    assert (p.returncode, p.stdout, p.stderr) == (1, "", (
        f"{ERROR}train: --nproc: this process is already a worker (RANK=1 is set); run it without "
        "--nproc, or unset RANK to launch workers from here\n"))
    # A config error is reported once, by the launcher, before any worker starts.
    p = subprocess.run([ftune_bin(), "train", "--nproc", "2", "--config", tmp_path / "nope.yaml"],
                       capture_output=True, text=True, timeout=60, env=base_env())
    assert p.returncode == 1 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"{ERROR}{tmp_path / 'nope.yaml'}: cannot read: no such file")
