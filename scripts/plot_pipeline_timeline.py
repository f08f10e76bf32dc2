"""Gantt chart of one pipeline-parallel optimizer step from the pipeline_timeline.json that
`ftune train` (parallel.strategy: pipeline) writes in its output dir: one row per stage (stage 0
on top), one bar per forward (F) or backward (B) slot labelled with its micro-batch, idle time left
as gaps; the title compares the measured bubble with the theoretical one. matplotlib, Agg backend
(no display needed); a test/bench tool, ftune itself never runs Python.
Usage: .venv/bin/python scripts/plot_pipeline_timeline.py RUN_DIR_OR_JSON [--out PNG]
  (default PNG: pipeline_timeline.png next to the JSON). A missing or malformed JSON is reported
  as one line naming the file and the field, exit code 2."""
import argparse
import json
import os
import sys

COLORS = {"F": "#4C72B0", "B": "#DD8452"}
NAMES = {"F": "forward", "B": "backward"}


class TimelineError(Exception):
    pass


def _need(obj, key, types, where):
    if key not in obj:
        raise TimelineError(f"{where}{key}: missing")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, types):
        raise TimelineError(f"{where}{key}: expected {_kind(types)}, got {json.dumps(v)[:40]}")
    return v


def _kind(types):
    return "a string" if types is str else "an integer" if types is int else "a number"


def load_timeline(path):
    """The parsed timeline, checked field by field; raises TimelineError("field: problem")."""
    try:
        with open(path) as f:
            t = json.load(f)
    except OSError as e:
        raise TimelineError(f"cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise TimelineError(f"not valid JSON: {e}") from None
    if not isinstance(t, dict):
        raise TimelineError("expected a JSON object at the top level")
    _need(t, "schedule", str, "")
    p = _need(t, "stages", int, "")
    _need(t, "micro_batches", int, "")
    if p < 1:
        raise TimelineError(f"stages: expected >= 1, got {p}")
    for k in ("bubble", "theoretical_bubble"):
        _need(t, k, (int, float), "")
    spans = t.get("spans")
    if not isinstance(spans, list) or not spans:
        raise TimelineError("spans: missing or not a non-empty list")
    for i, s in enumerate(spans):
        where = f"spans[{i}]."
        if not isinstance(s, dict):
            raise TimelineError(f"spans[{i}]: expected an object")
        st = _need(s, "stage", int, where)
        if not 0 <= st < p:
            raise TimelineError(f"{where}stage: {st} outside 0..{p - 1}")
        _need(s, "micro_batch", int, where)
        if s.get("kind") not in COLORS:
            raise TimelineError(f"{where}kind: expected \"F\" or \"B\", got "
                                f"{json.dumps(s.get('kind'))}")
        a, b = _need(s, "start", (int, float), where), _need(s, "end", (int, float), where)
        if b < a:
            raise TimelineError(f"{where}end: {b} before start {a}")
    for k in ("busy_s", "peak_mem_bytes", "max_in_flight"):
        if k in t and (not isinstance(t[k], list) or len(t[k]) != p):
            raise TimelineError(f"{k}: expected a list of {p} values (one per stage)")
    return t


def plot(t, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    p = t["stages"]
    end = max(s["end"] for s in t["spans"])
    makespan = max(float(t.get("makespan_s", end)), end)
    ms = 1e3  # seconds -> milliseconds on the axis
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.8 * p))
    for s in t["spans"]:
        x, w = s["start"] * ms, (s["end"] - s["start"]) * ms
        ax.broken_barh([(x, w)], (s["stage"] - 0.4, 0.8), facecolors=COLORS[s["kind"]],
                       edgecolors="white", linewidth=0.5)
        if w > 0:
            ax.text(x + w / 2, s["stage"], str(s["micro_batch"]), ha="center", va="center",
                    fontsize=8, color="white", clip_on=True)
    labels = []
    for i in range(p):
        lab = f"stage {i}"
        if "busy_s" in t and makespan > 0:
            lab += f"\nbusy {100 * t['busy_s'][i] / makespan:.0f}%"
        if "max_in_flight" in t:
            lab += f", <= {t['max_in_flight'][i]} in flight"
        if "peak_mem_bytes" in t:
            lab += f"\n{t['peak_mem_bytes'][i] / 2**20:.0f} MiB peak"
        labels.append(lab)
    ax.set_yticks(range(p), labels)
    ax.set_ylim(p - 0.5, -0.5)  # stage 0 on top
    ax.set_xlim(0, makespan * ms * 1.01)
    ax.set_xlabel("ms from the start of the step")
    ax.grid(axis="x", alpha=0.3)
    step = f", step {t['step']}" if "step" in t else ""
    ax.set_title(f"{t['schedule']} schedule: P={p} stages, M={t['micro_batches']} micro-batches"
                 f"{step}; bubble measured {100 * t['bubble']:.1f}% vs theoretical "
                 f"{100 * t['theoretical_bubble']:.1f}%")
    ax.legend(handles=[Patch(color=c, label=NAMES[k]) for k, c in COLORS.items()],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run dir (its pipeline_timeline.json) or the JSON file itself")
    ap.add_argument("--out", help="PNG to write (default: pipeline_timeline.png next to the JSON)")
    a = ap.parse_args(argv)
    path = os.path.join(a.run, "pipeline_timeline.json") if os.path.isdir(a.run) else a.run
    try:
        t = load_timeline(path)
    except TimelineError as e:
        print(f"plot_pipeline_timeline.py: {path}: {e}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(path)), "pipeline_timeline.png")
    plot(t, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
