"""``secateurs`` command line: train, report, list.

Errors that come from bad input (SecateursError) print one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import yaml

from .errors import ConfigError, SecateursError


def _parse_set(items: Sequence[str]) -> dict[str, tuple[str, object]]:
    """``--set KEY=VALUE`` items as ``{key: (how it was given, value)}``; values are YAML, read
    strictly (a key twice inside one value is refused)."""
    from .experiments.config import load_yaml_text, yaml_problem

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=3), got {item!r}")
        key, value = (part.strip() for part in item.split("=", 1))
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key is empty or has an empty part; write e.g. train.epochs=3")
        try:
            parsed = load_yaml_text(value, f"--set {key}")
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {key}={value}: the value is not valid YAML ({yaml_problem(e)}). "
                "Write lists as [0.5, 0.9], and quote strings with special characters"
            ) from None
        except ConfigError as e:
            raise ConfigError(f"--set {key}={value}: {e}") from None
        _add(out, key, f"--set {key}={value}", parsed)
    return out


def _add(out: dict[str, tuple[str, object]], key: str, given: str, value) -> None:
    """Add one override, refusing a key already given, or one inside (or around) a given key:
    which of the two wins would depend on their order, so neither may silently."""
    for other, (how, _) in out.items():
        if other == key:
            raise ConfigError(f"{key} is given twice ({how} and {given}); keep one")
        if key.startswith(other + ".") or other.startswith(key + "."):
            outer, inner = (other, key) if key.startswith(other + ".") else (key, other)
            raise ConfigError(
                f"{inner} is given twice, on its own and inside {outer} ({how} and {given}): which one wins would "
                f"depend on their order. Keep one, or write {inner} into {outer}'s value"
            )
    out[key] = (given, value)


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The dotted config overrides of ``--set`` and of the flags that stand for config keys
    (``flags``: attribute -> key), one key at most once (see :func:`_add`)."""
    out = _parse_set(args.set)
    for attr, key in flags.items():
        value = getattr(args, attr)
        if value is None:
            continue
        flag = "--" + attr.replace("_", "-")
        shown = " ".join(f"{flag} {v}" for v in value) if isinstance(value, list) else f"{flag} {value}"
        _add(out, key, shown, list(value) if isinstance(value, list) else value)
    return {key: value for key, (_, value) in out.items()}


#: The flags of ``secateurs train`` that stand for config keys.
TRAIN_FLAGS = {
    "name": "name", "seed": "seed", "device": "device", "model": "model.name",
    "dataset": "data.dataset", "data_root": "data.root", "method": "prune.method",
    "scope": "prune.scope", "epochs": "train.epochs", "finetune_epochs": "finetune.epochs",
    "batch_size": "data.batch_size", "sparsity": "prune.sparsities",
}


def cmd_train(args: argparse.Namespace) -> int:
    from .experiments import RunDir, load_config
    from .experiments.sweep import check_sweep, dense_reuse, run_sweep

    overrides = _overrides(args, TRAIN_FLAGS)
    start_from = None
    if args.resume:
        run = RunDir(args.resume)
        if not run.config_path.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
        config = load_config(args.config or run.config_path, overrides)
        changed = run.changes(config)
        if changed:
            check_sweep(config)  # a bad name fails before the message and before any directory is made
            start_from, run = run, RunDir.for_config(config, args.runs_dir if args.runs_dir is not None else run.path.parent)
            why_not = dense_reuse(start_from, config)
            finished = any(r.get("phase") == "dense" for r in start_from.results().get("levels", []))
            reused = (f"nothing of it is reused ({why_not})" if why_not else
                      f"{run.path} exists already and goes on with its own dense phase" if run.checkpoint("dense").is_file() else
                      "its finished dense phase is reused" if finished else
                      "its unfinished dense phase is copied and continued from its last epoch")
            print(f"--resume with a changed config ({', '.join(changed[:8])}): runs never mix, so this is "
                  f"a new run of the changed config and {start_from.path} is left as it is; {reused}")
    else:
        config = load_config(args.config, overrides)
        run = RunDir.for_config(config, args.runs_dir if args.runs_dir is not None else "runs")
    from . import distributed

    distributed.check_batch_size(config.data.batch_size, "data.batch_size")
    print(f"run directory: {run.path}")
    run_sweep(config, run, progress=not args.no_progress, start_from=start_from)
    distributed.on_main(_report, run, print_table=True)  # rank 0 writes the table and plots
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.compare import load_comparison, run_comparison

    overrides = _overrides(args, {"data_root": "base.data.root"})
    comparison = load_comparison(args.config, overrides)
    seeds = tuple(args.seeds) if args.seeds else None
    summary = run_comparison(comparison, args.runs_dir, seeds=seeds, progress=not args.no_progress, executor=args.executor,
                             threads=args.threads)
    print(f"\n{comparison.name}" + ("" if summary["complete"] else f" — INCOMPLETE, missing: {', '.join(summary['missing'])}"))
    print((Path(summary["dir"]) / "comparison.md").read_text())
    print(f"wrote {summary['dir']}/comparison.json, comparison.csv, comparison.md, accuracy_vs_sparsity.png")
    return _report_failures(summary["failed"])


def _report_failures(failed: list[dict]) -> int:
    """Units that failed (not those that diverged: a divergence is a result) make the exit
    status 1, after the table of everything that finished has been written."""
    broken = [f for f in failed if f["status"] == "failed"]
    for f in broken:
        print(f"FAILED {f['unit']}: {f['error']} (run directory {f['run']}; re-run the same command to retry it)")
    return 1 if broken else 0


def cmd_lottery(args: argparse.Namespace) -> int:
    from .experiments.lottery import config_seeds, format_lottery, load_lottery_config, run_lottery_seeds

    overrides = _overrides(args, {"data_root": "data.root"})
    config = load_lottery_config(args.config, overrides)
    seeds = args.seeds if args.seeds else config_seeds(args.config)
    summary = run_lottery_seeds(config, seeds, args.runs_dir, args.out, progress=not args.no_progress,
                                executor=args.executor, threads=args.threads)
    state = "" if summary["complete"] else f" — INCOMPLETE, missing: {', '.join(summary['missing'][:6])}"
    print(f"\n{config.name}{state}")
    print(format_lottery(summary))
    print(f"wrote {summary['dir']}/lottery.json, lottery.csv, lottery.md, accuracy_vs_remaining.png, early_stop_vs_remaining.png")
    return _report_failures(summary["failed"])


#: Experiments that live in one run directory per config: (command, module, the config loader,
#: runner and formatter in it, help, example configs, example override, files written).
SINGLE_RUN = {
    "structured": ("structured", "load_structured_config", "run_structured", "format_structured",
                   "remove channels to FLOP targets, fine-tune, measure size and latency",
                   "configs/structured_*.yaml", "structured.steps=3", "results.json, structured.md, compact/*.pt2"),
    "grow": ("growth", "load_growth_config", "run_growth", "format_growth",
             "grow an MLP during training: GradMax vs random vs zero growth (+ fixed baselines)",
             "configs/growth_*.yaml", "growth.events=5", "results.json, growth.md, growth_loss.png"),
    "grow-prune": ("grow_prune", "load_grow_prune_config", "run_grow_prune", "format_grow_prune",
                   "grow-and-prune architecture search for MLPs within a parameter / depth budget",
                   "configs/grow_prune_*.yaml", "seed=1", "results.json, grow_prune.md, grow_prune.png"),
    "linearize": ("linearize", "load_linearize_config", "run_linearize", "format_linearize",
                  "selective ReLU linearization: replace ReLUs by identity under a ReLU-count budget",
                  "configs/linearize_*.yaml", "seed=1", "results.json, linearize.md"),
    "indicators": ("indicators", "load_indicators_config", "run_indicators", "format_indicators",
                   "training-free indicators (NTK condition number, linear regions) vs trained accuracy",
                   "configs/indicators_*.yaml", "indicators.repeats=1", "results.json, indicators.md, indicators.png"),
}


def cmd_single_run(args: argparse.Namespace) -> int:
    import importlib

    from .experiments import RunDir

    module, load, run_fn, fmt, *_, written = SINGLE_RUN[args.command]
    experiment = importlib.import_module(f".experiments.{module}", __package__)
    overrides = _overrides(args, {"data_root": "data.root"})
    config = getattr(experiment, load)(args.config, overrides)
    run = RunDir.for_config(config, args.runs_dir)
    print(f"run directory: {run.path}")
    results = getattr(experiment, run_fn)(config, run, progress=not args.no_progress)
    print("\n" + getattr(experiment, fmt)(results))
    print(f"wrote {run.path}/{written.replace(', ', f', {run.path}/')}")
    return 0


def cmd_plasticity(args: argparse.Namespace) -> int:
    from .experiments.plasticity import format_plasticity, load_plasticity, run_plasticity

    overrides = _overrides(args, {"data_root": "base.data.root"})
    study = load_plasticity(args.config, overrides)
    result = run_plasticity(study, args.runs_dir, progress=not args.no_progress, executor=args.executor,
                            threads=args.threads)
    state = "" if not result["missing"] else f" — INCOMPLETE, missing: {', '.join(result['missing'][:6])}"
    print(f"\n{study.name}: accuracy change (pt) after pruning and {study.continue_epochs} epoch(s) of "
          f"continued training, without / with regeneration{state}")
    print(format_plasticity(result["cells"]))
    print(f"wrote {result['dir']}/plasticity.json, plasticity.csv, plasticity.png")
    return _report_failures(result["failed"])


def cmd_search(args: argparse.Namespace) -> int:
    from .experiments.search import format_search, load_search_config, run_search

    config = load_search_config(args.config, _overrides(args, {"data_root": "data.root"}))
    summary = run_search(config, args.runs_dir, executor=args.executor, threads=args.threads,
                         progress=not args.no_progress)
    print(f"\n{config.name}: best network within budget per strategy (mean ± std over {len(config.search_seeds)} search seeds)")
    print(format_search(summary))
    print(f"wrote {summary['dir']}/search.json, search.md, candidates.csv, pareto.png, surrogate.png")
    return _report_failures(summary["failed"])


def _report(run, print_table: bool) -> None:
    from .analysis.plots import plot_accuracy_vs_sparsity, plot_layer_sparsity
    from .analysis.report import format_table, to_csv
    from .experiments.runs import atomic_write_text

    results = run.results()
    rows = results.get("levels", [])
    if not rows:
        raise ConfigError(f"{run.path} has no results yet; run `secateurs train` first")
    title = f"{results.get('model', '')} on {results.get('dataset', '')}"
    atomic_write_text(run.path / "results.csv", to_csv(rows))
    plot_accuracy_vs_sparsity(rows, run.path / "accuracy_vs_sparsity.png", title)
    if any(r.get("layers") for r in rows):
        plot_layer_sparsity(rows, run.path / "layer_sparsity.png", title)
    if print_table:
        state = "complete" if results.get("complete") else "INCOMPLETE (re-run the same command to resume)"
        print(f"\n{title} — {state}\n{format_table(rows)}\n")
        print(f"wrote {run.path}/results.json, results.csv, accuracy_vs_sparsity.png, layer_sparsity.png")


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments import RunDir

    run = RunDir(args.run_dir)
    if not run.path.is_dir():
        raise ConfigError(f"{args.run_dir} is not a directory; pass a run directory under runs/")
    _report(run, print_table=True)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS
    from .regrowth import REGROWTH
    from .vocabulary import RESETS, SCOPES, SUBSETS

    from .experiments.sweep import _accepted_params

    # every table here is one a config (or a command's flag) chooses from, named by its key
    for title, registry in (("methods (prune.method)", METHODS), ("models (model.name)", MODELS),
                            ("datasets (data.dataset)", DATASETS)):
        print(f"{title}:")
        for entry in registry:
            print(f"  {entry.name:<16} {entry.description}")
            defaults = getattr(entry.obj, "train_defaults", None) if registry is MODELS else None
            if defaults:
                print(f"  {'':<16} unless the config sets them: {', '.join(f'{k}={v}' for k, v in defaults.items())}")
            if registry is METHODS:
                params = ", ".join(_accepted_params(entry.obj))
                print(f"  {'':<16} prunes {entry.obj.timing} training" if entry.obj.timing != "init"
                      else f"  {'':<16} prunes at initialisation")
                if params:
                    print(f"  {'':<16} prune.params: {params}")
    takes_regrowth = [e.name for e in METHODS if "regrowth" in _accepted_params(e.obj)]
    print(f"regrowth rules (prune.params.regrowth of {', '.join(takes_regrowth)}):")
    for entry in REGROWTH:
        print(f"  {entry.name:<16} {entry.description}")
    for vocab, keys in ((SCOPES, "prune.scope, lottery.scope, lottery.supermask.scope, structured.scope"),
                        (RESETS, "prune.reset, lottery.reset")):
        print(f"{vocab.kind}s ({keys}):")
        for name, meaning in vocab.meanings.items():
            print(f"  {name:<16} {meaning}")
    print("where only some apply:")
    for subset in SUBSETS:
        print(f"  {subset.procedure}: {', '.join(subset.names)}")
        print(f"  {'':<4}{subset.why}")
    from .criteria import CRITERIA
    from .resets import KEPT_INITS
    from .experiments.structured import IMPORTANCES

    print(f"lottery mask criteria (lottery.criterion):\n  {', '.join(CRITERIA.names())}")
    print(f"kept-weight inits (lottery.init, lottery.controls):\n  {', '.join(KEPT_INITS.names())}")
    print(f"channel importance (structured.importance):\n  {', '.join(IMPORTANCES)}")
    from .experiments.growth import ARMS

    print(f"growth arms (growth.arms; the first three are new-unit inits):\n  {', '.join(ARMS)}")
    from .layers import registered_layers
    from .structured.blocks import BLOCKS

    print(f"prunable layer types (secateurs.register_layer adds one):\n  {', '.join(registered_layers())}")
    from .experiments.oneshot import TEXTS

    print(f"text corpora (secateurs oneshot --text):\n  {', '.join(TEXTS.names())}")
    print("transformer block handlers (secateurs.structured.blocks.BLOCKS):")
    for entry in BLOCKS:
        print(f"  {entry.name:<20} {entry.description}")
    return 0


def cmd_oneshot(args: argparse.Namespace) -> int:
    from .experiments.oneshot import run_oneshot

    run_oneshot(args)
    return 0


def _executor_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor", default="local", metavar="NAME",
        help="where the runs go: local (one after another, here), processes:N (N processes on this machine), "
             "ray (a local Ray instance) or ray:HOST:PORT (a Ray cluster; --runs-dir must be on storage every node "
             "sees; pip install 'secateurs[ray]'). Default: local")
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch threads per run (default: the executor's share of the cores: all for local, cores/N for "
             "processes:N, 1 per Ray CPU). Results are bit-identical across executors given the same threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateurs", description="Prune, regrow and grow neural networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train, prune and fine-tune (resumes an interrupted run)")
    train.add_argument("--config", type=Path, help="experiment YAML (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=3")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory (its config must not change)")
    train.add_argument("--runs-dir", help="where run directories are created (default: runs; with --resume and a "
                       "changed config, next to the resumed run)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    for flag, kind, text in [
        ("--name", str, "run name"), ("--seed", int, "random seed"), ("--device", str, "auto, cpu or cuda"),
        ("--model", str, "model name (secateurs list)"), ("--dataset", str, "dataset name"),
        ("--data-root", str, "dataset directory / file"), ("--method", str, "pruning method"),
        ("--scope", str, "global, uniform, erk or er"), ("--epochs", int, "dense training epochs"),
        ("--finetune-epochs", int, "fine-tune epochs per level"), ("--batch-size", int, "training batch size"),
    ]:
        train.add_argument(flag, type=kind, help=text)
    train.add_argument("--sparsity", type=float, action="append", help="target sparsity (repeat for several levels)")
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser("compare", help="several methods x seeds on one task: mean +- std table and plot")
    compare.add_argument("--config", type=Path, required=True, help="comparison YAML (see configs/dst_*.yaml)")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. base.train.epochs=2")
    compare.add_argument("--seeds", type=int, nargs="+", help="run only these seeds (split a comparison across processes)")
    compare.add_argument("--data-root", help="dataset directory / file (overrides base.data.root)")
    compare.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    _executor_option(compare)
    compare.set_defaults(func=cmd_compare)

    lottery = sub.add_parser("lottery", help="iterative magnitude pruning / COLT rounds with controls (resumable per round)")
    lottery.add_argument("--config", type=Path, required=True, help="lottery YAML (see configs/lth_*.yaml)")
    lottery.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. lottery.rounds=3")
    lottery.add_argument("--seeds", type=int, nargs="+", help="run these seeds (default: the config's seeds)")
    lottery.add_argument("--data-root", help="dataset directory / file (overrides data.root)")
    lottery.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
    lottery.add_argument("--out", help="where the seed-aggregated table and plots go (default: RUNS_DIR/NAME-HASH-lottery, HASH over the config and seeds)")
    lottery.add_argument("--no-progress", action="store_true", help="no progress bars")
    _executor_option(lottery)
    lottery.set_defaults(func=cmd_lottery)

    for command, (*_, text, configs, example, _written) in SINGLE_RUN.items():
        single = sub.add_parser(command, help=text)
        single.add_argument("--config", type=Path, required=True, help=f"{command} YAML (see {configs})")
        single.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a key, e.g. {example}")
        single.add_argument("--data-root", help="dataset directory / file (overrides data.root)")
        single.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
        single.add_argument("--no-progress", action="store_true", help="no progress bars")
        single.set_defaults(func=cmd_single_run)

    plast = sub.add_parser("plasticity", help="pruning plasticity grid (GraNet Fig. 2): prune at epoch t by p, continue k epochs")
    plast.add_argument("--config", type=Path, required=True, help="plasticity YAML (see configs/plasticity_*.yaml)")
    plast.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. continue_epochs=2")
    plast.add_argument("--data-root", help="dataset directory / file (overrides base.data.root)")
    plast.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
    plast.add_argument("--no-progress", action="store_true", help="no progress bars")
    _executor_option(plast)
    plast.set_defaults(func=cmd_plasticity)

    search = sub.add_parser("search", help="architecture search under a device budget: PNAS, DNAS with pruning, "
                            "grow-and-prune, random search and zoo models, one Pareto front")
    search.add_argument("--config", type=Path, required=True, help="search YAML (see configs/search_*.yaml)")
    search.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. budget.latency_ms=0.5 or search_seeds=[0]")
    search.add_argument("--data-root", help="dataset directory / file (overrides data.root)")
    search.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
    search.add_argument("--no-progress", action="store_true", help="no progress bars")
    _executor_option(search)
    search.set_defaults(func=cmd_search)

    one = sub.add_parser("oneshot", help="prune a local Hugging Face causal LM with magnitude / Wanda / SparseGPT; perplexity before and after")
    one.add_argument("--model", required=True, help="local model directory (from_pretrained; never downloads)")
    from .methods.oneshot import METHODS_ONESHOT

    one.add_argument("--method", default="wanda", choices=list(METHODS_ONESHOT))
    one.add_argument("--sparsity", type=float, help="unstructured sparsity (default 0.5; with --nm, implied by it)")
    one.add_argument("--nm", help="N:M pattern instead, e.g. 2:4")
    one.add_argument("--text", help="registered text corpus for calibration and evaluation (secateurs list)")
    one.add_argument("--calib", help="calibration text file (with --eval)")
    one.add_argument("--eval", help="held-out text file for perplexity")
    one.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    one.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (default 128)")
    one.add_argument("--group", choices=["row", "tensor"],
                     help="where scores compare weights (default: the method's paper: row for magnitude / Wanda, tensor for RIA)")
    one.add_argument("--dampening", type=float, default=0.01, help="SparseGPT Hessian dampening (default 0.01)")
    one.add_argument("--precision", default="float64", choices=["float64", "float32"],
                     help="calibration statistics and SparseGPT solve (float32: half the memory; default float64)")
    one.add_argument("--allocation", default="uniform", choices=["uniform", "owl"],
                     help="sparsity per block: uniform, or owl (outlier-weighed: blocks with more outliers keep more)")
    one.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: the spread of block sparsities (default 0.08)")
    one.add_argument("--owl-m", type=float, default=5.0, help="OWL: a score is an outlier above M x its block's mean (default 5)")
    one.add_argument("--blocks", help="module path of the model's block list (default: found)")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--runs-dir", default="runs", help="where run directories are created (default: runs)")
    one.add_argument("--no-progress", action="store_true", help="no progress bars")
    one.set_defaults(func=cmd_oneshot)

    report = sub.add_parser("report", help="redraw the plots and tables of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)

    lst = sub.add_parser("list", help="registered methods, models, datasets")
    lst.set_defaults(func=cmd_list)
    return parser


#: Commands that run under ``torchrun`` (several processes training one model data-parallel).
DISTRIBUTED_COMMANDS = ("train",)


def _torchrun(command: str):
    """The process group for this command when torchrun started several processes: joined
    once here and left at the end (see :mod:`secateurs.distributed`). Only rank 0 prints: the
    other ranks' standard output goes nowhere (their errors still reach standard error)."""
    import contextlib
    import os

    from . import distributed

    world = distributed.env_world_size()
    if world <= 1:
        return contextlib.nullcontext()
    if command not in DISTRIBUTED_COMMANDS:
        raise ConfigError(
            f"secateurs {command} does not run under torchrun (WORLD_SIZE={world}); only "
            f"{', '.join(DISTRIBUTED_COMMANDS)} trains data-parallel. Run it as one process: python -m secateurs {command} ..."
        )
    stack = contextlib.ExitStack()
    stack.enter_context(distributed.session())
    if not distributed.is_main():
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return stack


def _reports_error(error: BaseException) -> bool:
    """Under torchrun, whether this rank prints ``error``: rank 0 always; another rank only an
    error of its own (a bad config, or a failure rank 0 shared, is printed once, by rank 0)."""
    from . import distributed

    if distributed.env_world_size() <= 1 or distributed.env_rank() == 0:
        return True
    return not (isinstance(error, ConfigError) or distributed.raised_on_main(error))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _torchrun(args.command):
            return args.func(args)
    except SecateursError as e:
        if _reports_error(e):
            print(f"secateurs: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `secateurs list | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a path the user gave that cannot be read or written, a full disk
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"secateurs: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsecateurs: interrupted; re-run the same command to resume from the last epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
