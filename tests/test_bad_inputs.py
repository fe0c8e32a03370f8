"""The catalogue of bad inputs (issue 20's measure): every one is answered with one line on
stderr and exit status 2, naming the problem; nothing is trained. Run in-process, so the whole
catalogue costs seconds."""
import re
from pathlib import Path

import pytest

from secateurs.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

FILES = {
    "empty.yaml": "",
    "dup.yaml": "train:\n  epochs: 1\ntrain:\n  epochs: 2\n",
    "bad.yaml": "train: [1, 2\n",
    "afile": "x",
    "cmp_empty.yaml": "name: x\nseeds: [0]\nbase: {data: {dataset: digits}}\nvariants: []\n",
    "cmp_badmethod.yaml": "name: x\nseeds: [0]\nbase: {data: {dataset: digits}, prune: {sparsities: [0.5]}}\n"
                          "variants: [{label: a, method: nope}]\n",
    "pl_late.yaml": "name: x\nprune_epochs: [20]\nratios: [0.5]\nbase: {data: {dataset: digits}, train: {epochs: 2}}\n",
    "run/config.yaml": "- not\n- a mapping\n",
    "run2/config.yaml": "name: x\n",
    "run2/results.json": "{bad",
    "run3/config.yaml": "name: x\ndata: {dataset: digits}\nprune: {sparsities: [0.5]}\n",
    "nullmodel.yaml": "data: {dataset: digits}\nmodel:\nprune: {sparsities: [0.5]}\n",
}

T = ["train", "--dataset", "digits"]
CASES = [
    # config files
    ("empty config", ["train", "--config", "{w}/empty.yaml"], "is empty"),
    ("duplicate keys", ["train", "--config", "{w}/dup.yaml"], "appears twice"),
    ("bad yaml", ["train", "--config", "{w}/bad.yaml"], "not valid YAML: line 2"),
    ("binary config", ["train", "--config", "{w}/bin.yaml"], "not a text file"),
    ("missing config", ["train", "--config", "{w}/nope.yaml"], "does not exist"),
    ("config is a directory", ["train", "--config", "{w}"], "is a directory"),
    ("a compare config to train", ["train", "--config", "{c}/dst_lenet5_fashion.yaml"], "secateurs compare --config"),
    ("a train config to compare", ["compare", "--config", "{c}/demo_lenet300_mnist.yaml"],
     ("unknown config key(s) data, finetune, model, prune, seed, train; known keys: name, variants, seeds, dense, base. "
      "{c}/demo_lenet300_mnist.yaml looks like a `secateurs train` config (it has a 'prune' section); "
      "run it with: secateurs train --config {c}/demo_lenet300_mnist.yaml")),
    ("a section left empty", ["train", "--config", "{w}/nullmodel.yaml"], "model is empty (null)"),
    ("a train config to lottery", ["lottery", "--config", "{c}/demo_lenet300_mnist.yaml"], "secateurs train --config"),
    # what to train
    ("epochs 0", [*T, "--epochs", "0", "--sparsity", "0.5"], "train.epochs is 0"),
    ("epochs -1", [*T, "--epochs", "-1", "--sparsity", "0.5"], "epochs must be >= 0"),
    ("epochs not a number", [*T, "--set", "train.epochs=abc", "--sparsity", "0.5"], "train.epochs must be an integer, got 'abc' (str)"),
    ("no sparsities", [*T], "prune.sparsities is empty"),
    ("empty sparsities", [*T, "--set", "prune.sparsities=[]"], "prune.sparsities is empty"),
    ("sparsity 1", [*T, "--sparsity", "1"], "must be in [0, 1)"),
    ("sparsity nan", [*T, "--sparsity", "nan"], "must be in [0, 1)"),
    ("sparsities decreasing", [*T, "--sparsity", "0.9", "--sparsity", "0.5"], "must increase"),
    ("warm-up past the end", [*T, "--sparsity", "0.5", "--epochs", "1", "--set", "train.lr_schedule.warmup_epochs=2"],
     "longer than the 1 epoch"),
    ("milestone past the end", [*T, "--sparsity", "0.5", "--epochs", "2", "--set", "train.lr_schedule.name=multistep",
                                "--set", "train.lr_schedule.milestones=[5]"], "past the end of training"),
    ("lr 0", [*T, "--sparsity", "0.5", "--set", "train.optimizer.lr=0"], "lr must be a finite number > 0"),
    ("unknown optimizer", [*T, "--sparsity", "0.5", "--set", "train.optimizer.name=lion"], "unknown optimizer 'lion'"),
    ("unknown health", [*T, "--sparsity", "0.5", "--set", "train.health=maybe"], "unknown health"),
    ("batch size 0", [*T, "--batch-size", "0", "--sparsity", "0.5"], "batch_size must be an integer >= 1, got 0 (int)"),
    # where and on what
    ("device tpu", [*T, "--sparsity", "0.5", "--device", "tpu"], "not a device"),
    ("runs-dir is a file", [*T, "--sparsity", "0.5", "--runs-dir", "{w}/afile"], "is a file, not a directory"),
    ("runs-dir under a file", [*T, "--sparsity", "0.5", "--runs-dir", "{w}/afile/x"], "is a file, not a directory"),
    ("data-root missing", ["train", "--dataset", "fashion-mnist", "--data-root", "{w}/nowhere", "--sparsity", "0.5"],
     "train-images-idx3-ubyte"),
    ("model too big for the images", [*T, "--model", "lenet5", "--sparsity", "0.5"], "image_size >= 16"),
    # --set
    ("--set bad yaml", [*T, "--set", "prune.sparsities=[0.5,"], "not valid YAML"),
    ("--set without =", [*T, "--set", "train.epochs"], "KEY=VALUE"),
    ("--set empty key", [*T, "--set", "=1"], "the key is empty"),
    ("--set twice", [*T, "--set", "train.epochs=1", "--set", "train.epochs=2"], "given twice"),
    ("--set unknown key", [*T, "--set", "train.epoch=1", "--sparsity", "0.5"], "unknown config key(s) train.epoch"),
    ("--set a section to a number", [*T, "--set", "train=3", "--sparsity", "0.5"], "train must be a mapping"),
    ("--set into a number", [*T, "--set", "seed.x=3", "--sparsity", "0.5"], "seed must be an integer"),
    ("--set a section to a number under lenet5", [*T, "--model", "lenet5", "--set", "train=3", "--sparsity", "0.5"],
     "train must be a mapping"),
    ("a flag and --set on one key", [*T, "--epochs", "3", "--set", "train.epochs=1", "--sparsity", "0.5"],
     "train.epochs is given twice (--set train.epochs=1 and --epochs 3)"),
    ("--set a key inside another --set", [*T, "--set", "train.optimizer={lr: 0.3}", "--set", "train.optimizer.lr=0.2"],
     "on its own and inside train.optimizer"),
    ("--data-root and --set data.root", [*T, "--data-root", "{w}", "--set", "data.root=/x", "--sparsity", "0.5"],
     "data.root is given twice"),
    ("a key twice in a --set value", [*T, "--set", "train.optimizer={lr: 0.3, lr: 0.2}"], "key 'lr' appears twice"),
    # names and method settings
    ("unknown method", [*T, "--method", "snap", "--sparsity", "0.5"], "unknown method 'snap'"),
    ("unknown model", [*T, "--model", "resnet21", "--sparsity", "0.5"], "unknown model 'resnet21'"),
    ("unknown dataset", ["train", "--dataset", "imagenet", "--sparsity", "0.5"], "unknown dataset 'imagenet'"),
    ("unknown scope", [*T, "--scope", "layer", "--sparsity", "0.5"], "unknown prune.scope"),
    ("unknown method param", [*T, "--method", "rigl", "--sparsity", "0.5", "--set", "prune.params.evry=5"],
     "does not take 'evry'"),
    ("param set twice", [*T, "--method", "rigl", "--sparsity", "0.5", "--set", "prune.params.sparsity=0.5"],
     "are set elsewhere"),
    ("a sweep setting as a method param", [*T, "--sparsity", "0.5", "--set", "prune.params.total_steps=100"],
     "prune.params ['total_steps'] are set elsewhere"),
    ("schedule point past the end", [*T, "--method", "rigl", "--sparsity", "0.5", "--set", "prune.params.end=99999"],
     "past the end of training"),
    ("reset for a during-training method", [*T, "--method", "rigl", "--sparsity", "0.5", "--set", "prune.reset=rewind"],
     "does not apply to 'rigl'"),
    ("unknown reset", [*T, "--sparsity", "0.5", "--set", "prune.reset=foo"], "unknown prune.reset"),
    # run directories
    ("resume a file", ["train", "--resume", "{w}/afile"], "no config.yaml there"),
    ("resume a corrupt run", ["train", "--resume", "{w}/run"], "must hold a mapping of keys"),
    ("resume with an unknown model", ["train", "--resume", "{w}/run3", "--set", "model.name=nope"], "unknown model 'nope'"),
    ("report a missing directory", ["report", "{w}/nope"], "is not a directory"),
    ("report a run without results", ["report", "{w}"], "has no results yet"),
    ("report corrupt results", ["report", "{w}/run2"], "is corrupted"),
    # the other commands
    ("compare without variants", ["compare", "--config", "{w}/cmp_empty.yaml"], "at least one entry under variants"),
    ("compare a bad method", ["compare", "--config", "{w}/cmp_badmethod.yaml"], "unknown method 'nope'"),
    ("compare unknown seeds", ["compare", "--config", "{c}/dst_lenet5_fashion.yaml", "--seeds", "99"], "not in the comparison"),
    ("compare no seeds", ["compare", "--config", "{c}/dst_lenet5_fashion.yaml", "--set", "seeds=[]"], "at least one seed"),
    ("lottery rounds -1", ["lottery", "--config", "{c}/lth_lenet300_mnist.yaml", "--set", "lottery.rounds=-1"], "lottery.rounds"),
    ("plasticity epoch past the run", ["plasticity", "--config", "{w}/pl_late.yaml"], "go beyond the dense run"),
    ("plasticity no ratios", ["plasticity", "--config", "{c}/plasticity_lenet300_fashion.yaml", "--set", "ratios=[]"],
     "at least one pruning ratio"),
    ("structured unknown key", ["structured", "--config", "{c}/structured_lenet5_mnist.yaml", "--set", "structured.targets=[2]"],
     "unknown config key(s) structured.targets"),
    ("grow events -1", ["grow", "--config", "{c}/growth_mlp_mnist.yaml", "--set", "growth.events=-1"], "growth.events"),
    ("linearize budget 2", ["linearize", "--config", "{c}/linearize_lenet5_mnist.yaml", "--set", "snl.budgets=[2]"], "snl.budgets"),
    ("indicators repeats 0", ["indicators", "--config", "{c}/indicators_mnist.yaml", "--set", "indicators.repeats=0"],
     "indicators.repeats"),
    ("grow-prune budget -5", ["grow-prune", "--config", "{c}/grow_prune_mnist.yaml", "--set", "grow_prune.max_params=-5"],
     "grow_prune.max_params"),
    ("oneshot without a model directory", ["oneshot", "--model", "{w}/nomodel"], "no config.json there"),
    ("oneshot model is a file", ["oneshot", "--model", "{w}/afile"], "no config.json there"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = tmp_path_factory.mktemp("bad")
    for name, text in FILES.items():
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        (w / name).write_text(text)
    (w / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    return w


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_clear_line(workdir, tmp_path, capsys, argv, fragment):
    def place(text):  # not str.format: some arguments hold YAML braces
        return text.replace("{w}", str(workdir)).replace("{c}", str(CONFIGS))

    argv, fragment = [place(a) for a in argv], place(fragment)
    if argv[0] != "report" and "--runs-dir" not in argv:
        argv += ["--runs-dir", str(tmp_path / "runs")]
    if argv[0] not in ("report",):
        argv += ["--no-progress"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("secateurs: error: ") and err.count("\n") == 1, f"one line, no traceback: {err}"
    assert fragment in err, err
    assert not list(tmp_path.glob("runs/*/checkpoints/*.pt")), "nothing is trained on bad input"


def test_the_catalogue_is_what_the_closing_note_counts():
    assert len(CASES) == len({c[0] for c in CASES}) >= 60
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    counts = [int(n) for n in re.findall(r"test_bad_inputs\.py` lists (\d+)", readme)]
    assert counts == [len(CASES)], f"README.md counts {counts} bad inputs; this catalogue lists {len(CASES)}"
