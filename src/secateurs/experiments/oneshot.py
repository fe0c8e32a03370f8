"""``secateurs oneshot``: prune a pretrained causal language model from a local directory with
magnitude, Wanda or SparseGPT, and measure held-out perplexity before and after.

One run directory per setting (named by a hash of the settings), holding ``config.json``, the
sequencer's per-block ``state.pt`` (a killed run resumes at the next block),
``results.json`` / ``results.csv`` and the pruned model (``model/``, ``save_pretrained``
with the masks applied, loadable by ``from_pretrained`` without secateurs).

Text comes from a local file (``--calib FILE``: the whole file is the calibration pool;
``--eval FILE``) or a registered text corpus (``--text kjv``), split in order into
train / validation / test (90 / 5 / 5 %): calibration windows are drawn from train, perplexity
is measured on test.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, DataError
from ..registry import Registry

TEXTS: Registry[Callable[[], str]] = Registry("text corpus")


@TEXTS.register("kjv", "the King James Bible (1611, public domain), from Debian's bible-kjv package")
def _kjv() -> str:
    if shutil.which("bible") is None:
        raise DataError("the kjv corpus comes from Debian's bible-kjv package: apt-get install bible-kjv")
    out = subprocess.run(["bible", "Ge1:1-Re22:21"], capture_output=True, text=True, check=True).stdout
    return out


def split_text(text: str) -> dict[str, str]:
    """Train / validation / test by position (90 / 5 / 5 %), cut at line ends."""
    lines = text.splitlines(keepends=True)
    a, b = int(0.9 * len(lines)), int(0.95 * len(lines))
    return {"train": "".join(lines[:a]), "validation": "".join(lines[a:b]), "test": "".join(lines[b:])}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"cannot read the text file {path!r}: {err.strerror}") from None


def run_oneshot(args) -> dict:
    import transformers

    from ..methods.oneshot import calibration_samples, perplexity, prune_oneshot

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: no config.json there; give a local Hugging Face model directory")
    nm = None
    if args.nm:
        try:
            n, m = (int(v) for v in args.nm.split(":"))
        except ValueError:
            raise ConfigError(f"--nm must look like 2:4, got {args.nm!r}") from None
        nm = (n, m)
    if args.text is None and args.calib is None:
        raise ConfigError("give calibration text: --text kjv (a registered corpus) or --calib FILE")
    if args.text is not None:
        splits = split_text(TEXTS.get(args.text)())
        calib_text, eval_text = splits["train"], (_read(args.eval) if args.eval else splits["test"])
    else:
        calib_text = _read(args.calib)
        if not args.eval:
            raise ConfigError("with --calib FILE, also give the held-out text: --eval FILE")
        eval_text = _read(args.eval)
    settings = {
        "model": str(model_dir.resolve()), "method": args.method, "sparsity": args.sparsity if nm is None else None,
        "nm": args.nm, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
        "text": args.text, "calib": args.calib, "eval": args.eval, "group": args.group,
        "dampening": args.dampening, "blocks": args.blocks,
    }
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    run = Path(args.runs_dir) / f"oneshot-{model_dir.name}-{args.method}-{digest}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    if (run / "results.json").is_file():
        print(f"run directory: {run} (already complete)")
        return json.loads((run / "results.json").read_text())
    print(f"run directory: {run}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    calib_ids = torch.tensor(tokenizer(calib_text)["input_ids"])
    eval_ids = torch.tensor(tokenizer(eval_text)["input_ids"])
    samples = calibration_samples(calib_ids, args.nsamples, args.seqlen, args.seed)
    before = perplexity(model, eval_ids, args.seqlen)
    t0 = time.perf_counter()
    result = prune_oneshot(model, samples, args.method, args.sparsity, nm=nm, group=args.group, blocks=args.blocks,
                           dampening=args.dampening, state_path=str(run / "state.pt"), progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    after = perplexity(model, eval_ids, args.seqlen)
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    results = {
        "method": args.method, "pattern": args.nm or f"{args.sparsity:.0%}", "sparsity": result.sparsity,
        "nsamples": args.nsamples, "perplexity_dense": before, "perplexity_pruned": after,
        "prune_seconds": seconds, "blocks": len(result.blocks), "eval_tokens": int(eval_ids.numel()),
    }
    tmp = run / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    with open(run / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results))
        writer.writeheader()
        writer.writerow(results)
    os.replace(tmp, run / "results.json")
    print(f"{args.method} {results['pattern']}: perplexity {before:.2f} -> {after:.2f} "
          f"(sparsity {result.sparsity:.4f}, pruning {seconds:.1f} s)")
    return results
