"""Tables of results: text for the terminal, CSV for spreadsheets."""
from __future__ import annotations

import csv
import io
import statistics
from typing import Sequence

COLUMNS = ("target_sparsity", "sparsity", "acc_before_finetune", "test_acc")


def _pct(value, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}} " if value is None else f"{100 * value:{width}.{digits}f}%"


def _flops(row: dict, kind: str):
    return (row.get("flops") or {}).get(kind)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table of accuracy vs. sparsity (percentages; FLOPs as % of dense;
    ``acc pruned`` is before fine-tuning, for methods that prune a trained network)."""
    header = (f"{'target':>8} {'achieved':>9} {'weights':>15} {'acc pruned':>11} {'acc final':>10} "
              f"{'infer FLOPs':>12} {'train FLOPs':>12}")
    lines = [header, "-" * len(header)]
    for r in rows:
        weights = f"{r['active']}/{r['numel']}" if "active" in r else "dense"
        lines.append(
            f"{100 * r['target_sparsity']:7.1f}% {100 * r['sparsity']:8.2f}% {weights:>15} "
            f"{_pct(r.get('acc_before_finetune'), 10)} {_pct(r['test_acc'], 9)} "
            f"{_pct(_flops(r, 'inference'), 11, 1)} {_pct(_flops(r, 'training'), 11, 1)}"
            + ("  FAILED (learned nothing)" if r.get("health") else "")
        )
    failed = [r for r in rows if r.get("health")]
    for r in failed:
        lines.append(f"FAILED {r['phase']}: {r['health']}")
    return "\n".join(lines)


def to_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["phase", *COLUMNS, "test_loss", "active", "numel", "inference_flops", "training_flops", "health"])
    for r in rows:
        writer.writerow([
            r["phase"], *(r.get(c) if r.get(c) is not None else "" for c in COLUMNS), r["test_loss"],
            r.get("active", ""), r.get("numel", ""),
            *("" if _flops(r, k) is None else _flops(r, k) for k in ("inference", "training")),
            health_cell(r),
        ])
    return out.getvalue()


def health_cell(row: dict) -> str:
    """A row's training-health verdict for a CSV cell: the failure, "ok" for a phase checked
    and healthy (None), empty for a row written before the check existed (nothing is known)."""
    if "health" not in row:
        return ""
    return row["health"] or "ok"


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation and count over seeds, the one summary every aggregated
    table uses; missing values (None) are left out, and no values give ``mean``/``std`` None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}
