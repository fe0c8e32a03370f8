"""Benchmarks print their results and write a file only where ``--out`` says: never into the
repository by default. bench_dst stands for the scripts that share this rule (its quick mode
on batches of 2 takes seconds)."""
import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_dst_prints_without_out_and_writes_only_its_out(tmp_path, monkeypatch, capsys):
    bench = load("bench_dst")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in BENCHMARKS.iterdir())
    monkeypatch.setattr(sys, "argv", ["bench_dst.py", "--quick", "--batch-size", "2"])
    bench.main()
    assert '"ratio_to_dense"' in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and sorted(p.name for p in BENCHMARKS.iterdir()) == before

    out = tmp_path / "results" / "dst.json"
    monkeypatch.setattr(sys, "argv", ["bench_dst.py", "--quick", "--batch-size", "2", "--out", str(out)])
    bench.main()
    assert f"wrote {out}" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["ratio_to_dense"]) == {"dense", "gmp", "set", "rigl", "granet"}
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_the_recorded_results_the_readme_cites_exist():
    readme = (BENCHMARKS.parent / "README.md").read_text()
    for name in ("masks", "loader", "dst", "structured"):
        assert f"--out benchmarks/results/{name}.json" in readme.replace("\n", " ")
        assert json.loads((BENCHMARKS / "results" / f"{name}.json").read_text()), f"{name}.json is empty"
    assert not list(BENCHMARKS.glob("results_*.json")), "results live in benchmarks/results/ only"
