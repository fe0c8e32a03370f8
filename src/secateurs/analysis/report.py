"""Tables of results: text for the terminal, CSV for spreadsheets."""
from __future__ import annotations

import csv
import io
from typing import Sequence

COLUMNS = ("target_sparsity", "sparsity", "acc_before_finetune", "test_acc")


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width table of accuracy vs. sparsity (percentages)."""
    header = f"{'target':>8} {'achieved':>9} {'weights':>11} {'acc pruned':>11} {'acc tuned':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        weights = f"{r['active']}/{r['numel']}" if "active" in r else "dense"
        lines.append(
            f"{100 * r['target_sparsity']:7.1f}% {100 * r['sparsity']:8.2f}% {weights:>11} "
            f"{100 * r['acc_before_finetune']:10.2f}% {100 * r['test_acc']:9.2f}%"
        )
    return "\n".join(lines)


def to_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["phase", *COLUMNS, "test_loss", "active", "numel"])
    for r in rows:
        writer.writerow([r["phase"], *(r[c] for c in COLUMNS), r["test_loss"], r.get("active", ""), r.get("numel", "")])
    return out.getvalue()
