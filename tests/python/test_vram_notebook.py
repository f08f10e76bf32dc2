"""notebooks/vram_analysis.ipynb, executed headless through nbclient (issue 11 item 5): every cell
runs against the built ftune, the notebook's own checks pass (the curves move the way the formulas
say), and it writes its five charts and a summary whose numbers are `ftune memory --json`'s."""
import json
import os

import nbformat
from nbclient import NotebookClient

from ftune_testing import SOURCE_DIR, ftune

NOTEBOOK = SOURCE_DIR / "notebooks" / "vram_analysis.ipynb"
CHARTS = ["model_size.png", "breakdown.png", "micro_batch.png", "context_length.png",
          "strategies.png"]


def test_notebook_runs_and_draws_its_charts(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAM_OUT", str(tmp_path))
    monkeypatch.setenv("FTUNE_ROOT", str(SOURCE_DIR))
    monkeypatch.setenv("FTUNE_BIN", os.environ["FTUNE_BIN"])
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(SOURCE_DIR)}}).execute()
    for name in CHARTS:
        assert (tmp_path / name).stat().st_size > 10_000, name
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "all checks passed; 5 charts" in outputs
    # The summary's figures are the binary's, not the notebook's arithmetic.
    summary = json.loads((tmp_path / "summary.json").read_text())
    j = json.loads(ftune("memory", "--model", "Llama-2-7B", "--strategy", "fsdp",
                         "--world-size", "8", "--grad-ckpt", "--json").stdout)
    assert summary["strategies"]["fsdp"][2] == j["total"] / 1e9
    j = json.loads(ftune("memory", "--model", "Llama-2-70B", "--lora-r", "16", "--qlora",
                         "--grad-ckpt", "--json").stdout)
    assert summary["model_size"]["Llama-2-70B/QLoRA r=16"] == j["total"]
