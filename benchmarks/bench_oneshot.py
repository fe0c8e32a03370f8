"""One-shot pruning of the KJV language model: secateurs against the reference formulation.

For Wanda and SparseGPT at 50% and 2:4, runs the pruning pass of ``secateurs.methods.oneshot``
and of ``benchmarks/reference_oneshot.py`` (the authors' algorithms as their code computes
them) on the same model and calibration windows, each pass in a fresh process so its peak
memory is its own. Reports held-out perplexity, the share of mask entries both agree on,
the pass time and the peak resident memory the pass added over the loaded model and data.
SparseGPT also runs with ``precision="float32"`` (the reference code's precision).

    python examples/oneshot_kjv.py --out runs/oneshot-kjv      # trains the model once
    python benchmarks/bench_oneshot.py --model runs/oneshot-kjv/dense --out benchmarks/results/oneshot.json

Without ``--out`` it prints the table and writes nothing. ``--smoke`` uses a tiny random
Llama and random tokens (for the test suite).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GRID = [(m, p) for m in ("wanda", "sparsegpt") for p in ("50%", "2:4")]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """The peak resident memory while the block runs, sampled every millisecond by a thread
    (the process's own high-water mark is set earlier, by loading the corpus)."""

    def __enter__(self):
        import threading

        self.start = self.peak = _rss_mib()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, _rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())
        self.added = self.peak - self.start


def _load(model_dir: str | None, nsamples: int, seqlen: int, seed: int):
    import transformers

    from secateurs.methods.oneshot import calibration_samples

    if model_dir is None:  # smoke: a tiny random Llama on random tokens
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seqlen)
        model = transformers.LlamaForCausalLM(cfg).eval()
        g = torch.Generator().manual_seed(seed)
        train, test = torch.randint(0, 96, (20_000,), generator=g), torch.randint(0, 96, (4096,), generator=g)
    else:
        from secateurs.experiments.oneshot import TEXTS, split_text

        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        splits = split_text(TEXTS.get("kjv")())
        train = torch.tensor(tokenizer(splits["train"])["input_ids"])
        test = torch.tensor(tokenizer(splits["test"])["input_ids"])
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    return model, calibration_samples(train, nsamples, seqlen, seed), test


def one_pass(args) -> dict:
    """Runs in the child process: load, prune with one implementation, measure."""
    from secateurs.methods.oneshot import perplexity, prune_oneshot

    sys.path.insert(0, str(HERE))
    from reference_oneshot import reference_prune

    torch.set_num_threads(args.threads)
    model, samples, test = _load(args.model, args.nsamples, args.seqlen, args.seed)
    import gc

    gc.collect()
    nm = None if args.pattern == "50%" else tuple(int(v) for v in args.pattern.split(":"))
    with _PeakRSS() as memory:
        t0 = time.perf_counter()
        if args.impl.startswith("secateurs"):
            precision = "float32" if args.impl == "secateurs-float32" else "float64"
            masks = prune_oneshot(model, samples, args.method, 0.5, nm=nm, precision=precision).masks
        else:
            masks = reference_prune(model, samples, args.method, 0.5, nm=nm)
        seconds = time.perf_counter() - t0
    torch.save(masks, args.masks)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"impl": args.impl, "method": args.method, "pattern": args.pattern, "seconds": seconds,
            "peak_added_mib": memory.added, "model_mib": params, "ppl": perplexity(model, test, args.seqlen)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local model directory (default with --smoke: a tiny random Llama)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results JSON here (default: print only)")
    p.add_argument("--one", nargs=3, metavar=("IMPL", "METHOD", "PATTERN"), help=argparse.SUPPRESS)
    p.add_argument("--masks", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        args.impl, args.method, args.pattern = args.one
        print(json.dumps(one_pass(args)))
        return {}
    if args.model is None and not args.smoke:
        p.error("give --model DIR (see examples/oneshot_kjv.py) or --smoke")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, pattern in GRID:
            masks = {}
            impls = ("secateurs", "secateurs-float32", "reference") if method == "sparsegpt" else ("secateurs", "reference")
            for impl in impls:
                path = Path(tmp) / f"{impl}.pt"
                cmd = [sys.executable, __file__, "--one", impl, method, pattern, "--masks", str(path),
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                       "--threads", str(args.threads)]
                if args.model:
                    cmd += ["--model", args.model]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                masks[impl] = torch.load(path)
            total = sum(v.numel() for v in masks["reference"].values())
            for r in rows[-len(impls):]:  # the share of mask entries that agree with the reference
                r["mask_agreement"] = sum(int((masks[r["impl"]][k] == v).sum()) for k, v in masks["reference"].items()) / total
            print(f"{method} {pattern}: " + "; ".join(
                f"{r['impl']} ppl {r['ppl']:.2f}, {r['seconds']:.1f} s, +{r['peak_added_mib']:.0f} MiB, "
                f"masks {100 * r['mask_agreement']:.3f}%" for r in rows[-len(impls):]), flush=True)
    result = {"model": args.model or "smoke", "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
