"""scripts/plot_pipeline_timeline.py on hand-made pipeline_timeline.json files (the format ftune's
pipeline strategy writes): a well-formed 1F1B step at P=2, M=4 gives a non-empty PNG next to the
JSON (or at --out); a missing file, bad JSON or a bad field gives one line naming the file and the
field, exit code 2, and no PNG. Needs matplotlib, not the ftune binary."""
import json
import subprocess
import sys

import pytest

from ftune_testing import SOURCE_DIR

SCRIPT = SOURCE_DIR / "scripts" / "plot_pipeline_timeline.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_f_one_b(p=2, m=4, f=0.010, b=0.020):
    """A 1F1B step at P stages and M micro-batches with forward f and backward b seconds, on the
    schedule's dependency order (a forward after the previous stage's, a backward after the next
    stage's), each stage running its slots one at a time in 1F1B order."""
    order = []
    for s in range(p):
        warm = min(m, p - s)
        seq = [("F", i) for i in range(warm)]
        fi, bi = warm, 0
        while bi < m:
            seq.append(("B", bi))
            bi += 1
            if fi < m:
                seq.append(("F", fi))
                fi += 1
        order.append(seq)
    done, free, spans = {}, [0.0] * p, []
    pending = [list(seq) for seq in order]
    while any(pending):
        for s in range(p):
            while pending[s]:
                kind, i = pending[s][0]
                dep = ((s - 1, "F", i) if kind == "F" else (s + 1, "B", i) if s < p - 1
                       else (s, "F", i))
                if kind == "F" and s == 0:
                    ready = 0.0
                elif dep in done:
                    ready = done[dep]
                else:
                    break
                start = max(free[s], ready)
                end = start + (f if kind == "F" else b)
                spans.append({"stage": s, "micro_batch": i, "kind": kind, "start": start,
                              "end": end})
                done[(s, kind, i)] = free[s] = end
                pending[s].pop(0)
    makespan = max(free)
    busy = [m * (f + b)] * p
    return {"schedule": "1f1b", "stages": p, "micro_batches": m, "step": 20, "spans": spans,
            "busy_s": busy, "makespan_s": makespan, "bubble": 1 - sum(busy) / (p * makespan),
            "theoretical_bubble": (p - 1) / (m + p - 1), "max_in_flight": [p - s for s in range(p)],
            "peak_mem_bytes": [300 << 20, 280 << 20]}


def plot(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_png_next_to_the_json_and_at_out(tmp_path):
    t = one_f_one_b()
    assert len(t["spans"]) == 2 * 2 * 4 and abs(t["bubble"] - 0.2) < 1e-9
    (tmp_path / "pipeline_timeline.json").write_text(json.dumps(t))
    p = plot(tmp_path)  # a run dir
    assert p.returncode == 0, p.stderr
    png = tmp_path / "pipeline_timeline.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    out = tmp_path / "sub.png"
    p = plot(tmp_path / "pipeline_timeline.json", "--out", out)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC


def _broken(t):
    t["spans"][1]["kind"] = "X"
    return t


@pytest.mark.parametrize("name,content,field", [
    ("missing", None, "cannot read"),
    ("truncated", lambda: json.dumps(one_f_one_b())[:-40], "not valid JSON"),
    ("no_spans", lambda: json.dumps({k: v for k, v in one_f_one_b().items() if k != "spans"}),
     "spans: missing"),
    ("bad_kind", lambda: json.dumps(_broken(one_f_one_b())), "spans[1].kind"),
    ("bad_stage_count", lambda: json.dumps({**one_f_one_b(), "stages": "two"}),
     "stages: expected an integer"),
])
def test_broken_json_is_one_clear_line(tmp_path, name, content, field):
    path = tmp_path / f"{name}.json"
    if content is not None:
        path.write_text(content())
    p = plot(path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert str(path) in lines[0] and field in lines[0], lines[0]
    assert not (tmp_path / "pipeline_timeline.png").exists()
