"""``secateurs oneshot``: prune a pretrained causal language model from a local directory with
magnitude, Wanda or SparseGPT, and measure held-out perplexity before and after.

One run directory per setting (named by a hash of the non-default settings, as for every
other run), holding ``config.yaml``, the
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
import io
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..allocation import check_sparsity
from ..errors import ConfigError, DataError
from ..granularity import check_nm_config
from ..registry import Registry
from .config import HashedConfig
from .runs import RunDir, atomic_write_text

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


@dataclass(frozen=True)
class OneShotConfig(HashedConfig):
    """One ``secateurs oneshot`` run; its run directory is named by a hash of the non-default
    fields, like every other run."""

    name: str = "oneshot"
    model: str = ""
    method: str = "wanda"
    sparsity: float = 0.5
    nm: Optional[str] = None
    text: Optional[str] = None
    calib: Optional[str] = None
    eval: Optional[str] = None
    nsamples: int = 128
    seqlen: int = 128
    group: str = "row"
    dampening: float = 0.01
    precision: str = "float64"
    blocks: Optional[str] = None
    seed: int = 0
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0


def _parse_nm(value: Optional[str]) -> Optional[tuple[int, int]]:
    if not value:
        return None
    try:
        n, m = (int(v) for v in value.split(":"))
    except ValueError:
        raise ConfigError(f"--nm must look like 2:4, got {value!r}") from None
    return check_nm_config(n, m)


def run_oneshot(args) -> dict:
    import transformers

    from ..methods.oneshot import calibration_samples, default_group, perplexity, prune_oneshot

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: no config.json there; give a local Hugging Face model directory")
    nm = _parse_nm(args.nm)
    group = args.group or default_group(args.method)
    if nm is None:
        sparsity = 0.5 if args.sparsity is None else args.sparsity
        check_sparsity(sparsity)
    else:
        if args.sparsity is not None and abs(args.sparsity - (1.0 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"--sparsity {args.sparsity} contradicts --nm {args.nm}, which prunes exactly "
                              f"{1 - nm[0] / nm[1]:g}; give one of them")
        sparsity = 1.0 - nm[0] / nm[1]
    if args.method == "sparsegpt" and group != "tensor":
        raise ConfigError(f"--group {group} does not apply to sparsegpt, which chooses its mask over whole columns; "
                          "leave --group unset")
    if args.text is None and args.calib is None:
        raise ConfigError("give calibration text: --text kjv (a registered corpus) or --calib FILE")
    if args.calib is not None and not args.eval:
        raise ConfigError("with --calib FILE, also give the held-out text: --eval FILE")
    config = OneShotConfig(
        name=f"oneshot-{model_dir.name}-{args.method}", model=str(model_dir.resolve()), method=args.method,
        sparsity=sparsity, nm=args.nm, text=args.text,
        calib=args.calib, eval=args.eval, nsamples=args.nsamples, seqlen=args.seqlen, group=group,
        dampening=args.dampening, blocks=args.blocks, seed=args.seed, precision=args.precision,
        allocation=args.allocation, owl_lambda=args.owl_lambda, owl_m=args.owl_m,
    )
    run = RunDir.for_config(config, args.runs_dir)
    if run.results().get("complete"):
        run.bind(config)
        print(f"run directory: {run.path} (already complete)")
        return run.results()
    if args.text is not None:
        splits = split_text(TEXTS.get(args.text)())
        calib_text, eval_text = splits["train"], (_read(args.eval) if args.eval else splits["test"])
    else:
        calib_text, eval_text = _read(args.calib), _read(args.eval)
    run.bind(config)
    print(f"run directory: {run.path}")
    with run.lock():
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        model.eval()
        calib_ids = torch.tensor(tokenizer(calib_text)["input_ids"])
        eval_ids = torch.tensor(tokenizer(eval_text)["input_ids"])
        samples = calibration_samples(calib_ids, args.nsamples, args.seqlen, args.seed)
        before = perplexity(model, eval_ids, args.seqlen)
        t0 = time.perf_counter()
        result = prune_oneshot(model, samples, args.method, config.sparsity, nm=nm, group=group,
                               blocks=args.blocks, dampening=args.dampening, precision=args.precision,
                               allocation=args.allocation, owl_lambda=args.owl_lambda, owl_m=args.owl_m,
                               state_path=str(run.path / "state.pt"),
                               progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        after = perplexity(model, eval_ids, args.seqlen)
        model.save_pretrained(run.path / "model")
        tokenizer.save_pretrained(run.path / "model")
        row = {
            "method": args.method, "pattern": args.nm or f"{sparsity:.0%}", "sparsity": result.sparsity,
            "nsamples": args.nsamples, "perplexity_dense": before, "perplexity_pruned": after,
            "prune_seconds": seconds, "blocks": len(result.blocks), "eval_tokens": int(eval_ids.numel()),
            "allocation": args.allocation if args.allocation == "uniform" else
            f"owl (lambda {args.owl_lambda:g}, M {args.owl_m:g}): " + " ".join(f"{x:.3f}" for x in result.block_sparsity),
        }
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
        atomic_write_text(run.path / "results.csv", table.getvalue())
        run.write_results({"complete": True, **row})  # written last: its presence means done
    print(f"{args.method} {row['pattern']}: perplexity {before:.2f} -> {after:.2f} "
          f"(sparsity {result.sparsity:.4f}, pruning {seconds:.1f} s)")
    return row
