"""One comparison run by each executor, side by side: ``local``, ``processes:2`` and ``ray``.

The comparison is ``configs/dst_lenet5_fashion.yaml`` (LeNet-5 on Fashion-MNIST, six
during-training methods) cut to ``--epochs`` / ``--sparsities`` / ``--seeds`` so that it fits
a short run; every executor starts from an empty run directory, and the aggregated tables must
be equal (the script says whether they are, bit for bit). Ray's overhead per unit is measured
on units that do nothing: the wall time of N of them through Ray minus the same N run locally,
divided by N (Ray's start-up is reported apart).

Run: ``python benchmarks/bench_executors.py [--out FILE]``; nothing is written without ``--out``
(the run directories live in a temporary directory that is deleted).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from secateurs.experiments.compare import comparison_units, load_comparison, run_comparison
from secateurs.experiments.runner import Unit, run_units

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dst_lenet5_fashion.yaml"


def noop(config, run, *, progress, echo, wait, dataset=None, **kwargs) -> dict:
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--executors", nargs="+", default=["local", "local@1", "processes:2", "ray"],
                        help="executor names; NAME@T runs each unit with T torch threads")
    parser.add_argument("--noop-units", type=int, default=40)
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (default: print them, write nothing)")
    args = parser.parse_args()
    comparison = load_comparison(CONFIG, {"base.train.epochs": args.epochs, "base.train.lr_schedule": {"name": "constant"},
                                          "base.prune.sparsities": args.sparsities, "seeds": args.seeds})
    units = comparison_units(comparison)
    quiet = dict(progress=False, echo=lambda s: None)
    wall, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.executors:
            runs = Path(tmp) / name.replace(":", "-").replace("@", "-t")
            spec, _, threads = name.partition("@")
            start = time.perf_counter()
            summary = run_comparison(comparison, runs, executor=spec, threads=int(threads) if threads else None, **quiet)
            wall[name] = time.perf_counter() - start
            if summary["failed"]:
                raise SystemExit(f"{name}: units failed: {summary['failed']}")
            tables[name] = json.loads((Path(summary["dir"]) / "comparison.json").read_text())["rows"]
            print(f"{name}: {wall[name]:.1f} s for {len(units)} units")
        overhead = None
        if "ray" in args.executors:
            import ray

            noops = [Unit(f"noop {i}", _renamed(units[0].config, i), noop) for i in range(args.noop_units)]
            start = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
            startup = time.perf_counter() - start
            t0 = time.perf_counter()
            run_units(noops, Path(tmp) / "noop-ray", "ray", **quiet)
            t_ray = time.perf_counter() - t0
            ray.shutdown()
            t0 = time.perf_counter()
            run_units(noops, Path(tmp) / "noop-local", "local", **quiet)
            t_local = time.perf_counter() - t0
            overhead = {"startup_s": startup, "per_unit_s": (t_ray - t_local) / len(noops), "units": len(noops)}
    first = args.executors[0]
    share = {"local": os.cpu_count(), "processes:2": max(1, (os.cpu_count() or 1) // 2), "ray": 1}
    threads = {name: int(name.partition("@")[2]) if "@" in name else share.get(name) for name in args.executors}
    same = {name: [n for n in args.executors if tables[n] == tables[name] and n != name] for name in args.executors}
    lines = [f"| executor ({len(units)} units, {os.cpu_count()} cores) | threads per unit | wall (s) | vs. {first} | "
             "same table, bit for bit, as |", "|---|---|---|---|---|"]
    lines += [f"| {name.partition('@')[0]} | {threads[name]} | {wall[name]:.1f} | {wall[name] / wall[first]:.2f}x | "
              f"{', '.join(f'{n.partition(chr(64))[0]} ({threads[n]} thr.)' for n in same[name]) or '-'} |"
              for name in args.executors]
    table = "\n".join(lines)
    print(table)
    if overhead:
        print(f"Ray: start-up {overhead['startup_s']:.1f} s; overhead {1000 * overhead['per_unit_s']:.1f} ms per unit "
              f"({overhead['units']} no-op units, Ray minus local)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"wall_s": wall, "tables_equal": same, "ray_overhead": overhead,
                                        "units": len(units), "cores": os.cpu_count(), "markdown": table,
                                        "args": {k: v for k, v in vars(args).items() if k != "out"}}, indent=2) + "\n")
        print(f"wrote {args.out}")


def _renamed(config, i: int):
    from dataclasses import replace

    return replace(config, name=f"noop-{i}")


if __name__ == "__main__":
    main()
