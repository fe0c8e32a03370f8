"""Dense vs 2:4 semi-structured sparse Linear on one NVIDIA GPU, as speed-up ratios.

Sparse tensor cores (Ampere and newer) execute a 2:4 weight at up to twice the dense math
throughput (Mishra et al. 2021, "Accelerating sparse deep neural networks"); this measures
what ``torch.sparse.to_sparse_semi_structured`` delivers through ``F.linear``, for the
weights of ``secateurs.granularity.to_semi_structured``, on both of its backends:
cuSPARSELt (the default) and CUTLASS (``SparseSemiStructuredTensor._FORCE_CUTLASS``).

For each weight shape ``[out, in]`` and token count ``t`` it times ``F.linear(x, w)`` with
``x: [t, in]`` for the dense 2:4-pruned weight and its sparse forms. Every round runs each
variant once (interleaved, so drifting clocks hit all alike) as a loop of ``iters`` calls
between two CUDA events; the median round is reported, and ``speedup = dense / sparse``.
The sparse outputs are checked against the dense ones (``max_rel_err``).

Run: ``python benchmarks/bench_nm.py [--quick] [--dtype float16|bfloat16] [--out FILE]``; nothing is
written without ``--out``.
On a machine without a suitable GPU it prints why and exits 0 without writing anything.
Imports torch only, so it runs wherever torch does.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

#: (label, out_features, in_features): a square 8192 layer and LLaMA-7B's MLP up / down projections.
SHAPES = [
    ("8192x8192", 8192, 8192),
    ("11008x4096 (mlp up)", 11008, 4096),
    ("4096x11008 (mlp down)", 4096, 11008),
]
TOKENS = [1, 16, 128, 1024, 4096, 8192]
QUICK_TOKENS = [16, 1024, 8192]


def gpu_problem() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    if torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; 2:4 sparsity needs >= 8.0"
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no semi-structured sparsity (needs >= 2.1)"
    return None


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (magnitude 2:4, Mishra et al. 2021)."""
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(w.shape).contiguous()


def sparse_variants(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The semi-structured forms of ``w`` per backend, and why any backend is missing."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    made, missing = {}, {}
    cusparselt = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: True)()
    for backend, force_cutlass in (("cusparselt", False), ("cutlass", True)):
        if backend == "cusparselt" and not cusparselt:
            missing[backend] = "torch.backends.cusparselt.is_available() is False"
            continue
        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
        try:
            made[backend] = to_sparse_semi_structured(w)
        except Exception as exc:  # a backend missing from this build: record it, keep going
            missing[backend] = f"{type(exc).__name__}: {exc}"
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return made, missing


def time_loop(fn, iters: int) -> float:
    """Milliseconds per call of ``fn`` over ``iters`` calls, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def calibrate(fn, target_ms: float) -> int:
    """Calls per timed loop so that one loop lasts about ``target_ms`` (launch noise averages out)."""
    for _ in range(3):
        fn()
    per_call = time_loop(fn, 5)
    return max(1, min(1000, round(target_ms / max(per_call, 1e-4))))


def measure(label: str, out_f: int, in_f: int, tokens: list[int], dtype: torch.dtype,
            rounds: int, target_ms: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense = prune_2_4(torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen))
    sparse, missing = sparse_variants(dense)
    rows = []
    for t in tokens:
        x = torch.randn(t, in_f, device="cuda", dtype=dtype, generator=gen)
        fns = {"dense": lambda: F.linear(x, dense)}
        notes, max_rel_err = dict(missing), {}
        ref = F.linear(x, dense).float()
        for backend, w in sparse.items():
            try:
                got = F.linear(x, w).float()
            except Exception as exc:  # e.g. a shape this backend rejects
                notes[backend] = f"{type(exc).__name__}: {exc}"
                continue
            max_rel_err[backend] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            fns[backend] = (lambda w=w: F.linear(x, w))
        with torch.inference_mode():
            iters = {name: calibrate(fn, target_ms) for name, fn in fns.items()}
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(rounds):
                for name, fn in fns.items():
                    times[name].append(time_loop(fn, iters[name]))
        ms = {name: statistics.median(v) for name, v in times.items()}
        row = {
            "shape": label, "out_features": out_f, "in_features": in_f, "tokens": t,
            "ms": ms, "iters": iters,
            "dense_tflops": 2 * t * out_f * in_f / (ms["dense"] * 1e-3) / 1e12,
            "speedup": {name: ms["dense"] / v for name, v in ms.items() if name != "dense"},
            "max_rel_err": max_rel_err,
            **({"notes": notes} if notes else {}),
        }
        rows.append(row)
        speed = ", ".join(f"{k} x{v:.2f}" for k, v in row["speedup"].items()) or "no sparse backend"
        print(f"{label:>22} tokens={t:>5}  dense {ms['dense']:.4f} ms  {speed}", flush=True)
        del x, ref
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer token counts and rounds")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file (default: print them, write nothing)")
    args = parser.parse_args(argv)

    problem = gpu_problem()
    if problem is not None:
        print(f"bench_nm: skipped: {problem}; this benchmark needs an NVIDIA GPU of compute "
              "capability >= 8.0 (Ampere or newer) and torch >= 2.1")
        return 0

    dtype = getattr(torch, args.dtype)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    rounds = 5 if args.quick else 15
    started = time.time()
    rows = []
    for label, out_f, in_f in SHAPES:
        rows += measure(label, out_f, in_f, tokens, dtype, rounds=rounds, target_ms=2.0 if args.quick else 5.0)
        torch.cuda.empty_cache()
    result = {
        "benchmark": "dense vs 2:4 semi-structured F.linear (median of interleaved rounds, CUDA events)",
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "rounds": rounds,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
