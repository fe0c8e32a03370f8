"""The Hugging Face structured-pruning benchmark must not rot between the runs that use it:
its smoke mode (tiny models, random data) runs here, both pruners included."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hf_structured.py"


def test_smoke_mode_prunes_both_models_with_both_methods(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_hf_structured", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--epochs", "0.2", "--steps", "2", "--targets", "0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k) for m in ("vit", "mobilenet_v2") for k in ("dense", "secateurs", "torch-pruning")}
    for r in rows:
        if r["method"] != "dense":
            assert r["macs_removed"] > 0.3 and r["params"] > 0
    assert "| model | method |" in (tmp_path / "results.md").read_text()
