"""README.md is a tested artefact: every ```python block runs, and every command line of its
```bash blocks runs, or is marked long with its measured time.

**Python blocks.** Each block runs in a fresh namespace, in a temporary working directory (the
blocks write files such as ``small.pt2``). Most blocks are fragments that use names a reader
already has (``model``, ``optimizer``, ``loader``, ``criterion``, ...). An HTML comment right
above the opening fence (invisible on GitHub) says how the test runs it::

    <!-- readme-test: setup=mnist_mlp check=magnitude replace "range(15)" "range(2)" -->

* ``setup=NAME[,NAME]``: run these preludes (``PRELUDES`` below) first, in the same namespace;
* ``replace "OLD" "NEW"``: replace OLD by NEW in the block before running it, to make it fast
  (OLD must occur in the block, so a stale annotation fails);
* ``check=NAME``: run these assertions (``CHECKS`` below) on the namespace afterwards.

A block without an annotation runs exactly as printed. A failure names the README line.
Hugging Face models are built from configs with random weights: nothing downloads.

**Command lines.** A line of a ```bash block that starts with ``secateurs``, ``make`` or
``python`` either has an entry in ``COMMANDS`` (run in-process with ``--set`` / flag overrides that
make it take seconds: tiny subsets of the datasets written to tmp, one epoch, one seed, run
directories in tmp), or ends in a comment with its measured time (``# ... ~70 s``), which marks
it long. ``test_every_command_line_is_run_or_marked_long`` checks that the two sets cover the
README exactly.
"""
from __future__ import annotations

import json
import linecache
import re
import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# --- parsing -------------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
ANNOTATION = re.compile(r"^[ \t]*<!--\s*readme-test:(?P<body>.*?)-->[ \t]*$")
LONG = re.compile(r"#.*~\s*\d+(?:\.\d+)?\s*(?:s|min|h)\b")
CLI_PREFIXES = ("secateurs ", "make ", "python ")


@dataclass
class Block:
    lang: str
    line: int  # README line of the first code line (1-based)
    code: str  # dedented by the fence's indentation
    annotation: str | None = None
    setups: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    replacements: list[tuple[str, str]] = field(default_factory=list)


def parse_annotation(block: Block) -> None:
    if block.annotation is None:
        return
    tokens = shlex.split(block.annotation)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("setup="):
            block.setups += [s for s in token[len("setup="):].split(",") if s]
        elif token.startswith("check="):
            block.checks += [c for c in token[len("check="):].split(",") if c]
        elif token == "replace":
            if i + 2 >= len(tokens):
                raise ValueError(f"README.md:{block.line}: `replace` needs two quoted strings, OLD and NEW")
            block.replacements.append((tokens[i + 1], tokens[i + 2]))
            i += 2
        else:
            raise ValueError(f"README.md:{block.line}: unknown readme-test directive {token!r} "
                             "(known: setup=NAME, check=NAME, replace \"OLD\" \"NEW\")")
        i += 1


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block, with the readme-test annotation on the lines right above it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent = match["indent"]
        notes, j = [], i - 1
        while j >= 0 and ANNOTATION.match(lines[j]):
            notes.insert(0, ANNOTATION.match(lines[j])["body"].strip())
            j -= 1
        body, k = [], i + 1
        while k < len(lines) and lines[k].strip() != "```":
            line = lines[k]
            if line.strip() and not line.startswith(indent):
                raise ValueError(f"README.md:{k + 1}: a code line is indented less than its fence")
            body.append(line[len(indent):])
            k += 1
        if k == len(lines):
            raise ValueError(f"README.md:{i + 1}: the ``` fence is never closed")
        block = Block(match["lang"], i + 2, "\n".join(body) + "\n", " ".join(notes) if notes else None)
        parse_annotation(block)
        blocks.append(block)
        i = k + 1
    return blocks


def prepared_source(block: Block) -> str:
    """The code the test runs: the block with its replacements."""
    code = block.code
    for old, new in block.replacements:
        if old not in code:
            raise AssertionError(f"README.md:{block.line}: replace {old!r}: not in the block (stale annotation)")
        code = code.replace(old, new)
    return code


def command_lines(blocks: list[Block]) -> list[tuple[int, str, bool]]:
    """(README line, command without its comment, marked long) for each CLI line of the
    ```bash blocks."""
    out = []
    for block in blocks:
        if block.lang != "bash":
            continue
        for offset, raw in enumerate(block.code.splitlines()):
            line = raw.strip()
            if not line.startswith(CLI_PREFIXES) and line not in ("secateurs", "make", "python"):
                continue
            command = re.sub(r"\s+", " ", line.split(" #")[0]).strip()
            out.append((block.line + offset, command, bool(LONG.search(line))))
    return out


TEXT = README.read_text()
BLOCKS = parse_blocks(TEXT)
PYTHON = [b for b in BLOCKS if b.lang == "python"]


# --- preludes and checks for the Python blocks ---------------------------------------------

PRELUDES = {
    # LeNet-300-100 with SGD and four random MNIST-shaped batches of 32 (and `import secateurs`,
    # as in the README's first block)
    "mnist_mlp": """
import torch, torch.nn as nn
import secateurs
from secateurs.models import create_model
model = create_model("lenet300_100")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
criterion = nn.CrossEntropyLoss()
loader = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(4)]
x, y = loader[0]
""",
    # a second LeNet-300-100 with its own optimizer
    "other_model": """
other_model = create_model("lenet300_100")
other_optimizer = torch.optim.SGD(other_model.parameters(), lr=0.05)
""",
    "epochs": "epochs = 100\n",
    # a small CIFAR-shaped CNN (Conv-2) for structured pruning
    "cifar_cnn": """
import torch
from secateurs.models import create_model
model = create_model("conv2", in_channels=3, image_size=32)
""",
    # an MLP that grows to LeNet-300-100's widths (net.1 and net.3 are its hidden Linear layers)
    "growing_mlp": """
import torch
from secateurs.models import MLP
model = MLP(784, (75, 25), 10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(4)]
probe_loader = loader[:2]
x, y = loader[0]
""",
    # LeNet-5 on a batch of MNIST-shaped images, and the lasso weight
    "lenet5": """
import torch
from secateurs.models import create_model
model = create_model("lenet5")
x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
lam = 1e-4
""",
    # a tiny Llama from a config (random weights) and random token streams
    "causal_lm": """
import torch, transformers
config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
model = transformers.LlamaForCausalLM(config).eval()
train_ids = torch.randint(0, 128, (4096,))
test_ids = torch.randint(0, 128, (512,))
""",
}

CHECKS = {
    "search": """
import torch
assert search.done and search.trained >= 4
assert all(fits(a) for a in search.observed)  # nothing over the budget was proposed
assert len(best) == max(len(a) for a in search.observed)  # the fake accuracy rewards length
assert build(best, shape)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
""",
    "magnitude": """
assert sparsifier.stats()["sparsity"] == 0.9
for name, p in model.named_parameters():
    if name in sparsifier.masks.masks:
        assert torch.count_nonzero(p.detach()[~sparsifier.masks.masks[name]]) == 0, name
""",
    "granet": """
assert sparsifier.history, "GraNet made no update in the loop"
assert 0 < sparsifier.stats()["sparsity"] < 0.95
""",
    "snip_synflow": """
assert sparsifier.stats()["sparsity"] == 0.98 and abs(synflow.stats()["sparsity"] - 0.999) < 1e-5
assert sparsifier.model is not synflow.model
""",
    "lottery": """
assert ticket.round == 2 and ticket.stats()["sparsity"] > 0.3
""",
    "structured": """
assert 0.45 < 1 - model_cost(small, x).macs / model_cost(model, x).macs < 0.55
assert torch.allclose(net(x), small.eval()(x), atol=1e-5)
""",
    "oneshot": """
assert result.sparsity == 0.5 and perplexity(model, test_ids, seq_len=32) > 1
""",
    "grower": """
assert model.net[1].out_features == 300 and model.net[3].out_features == 100
""",
    "linearize": """
assert relu_count(model)[0] == 1522
""",
    "grow_prune": """
assert record["params"] <= 100_000 and record["widths"] == [40]
assert row["regions"] > 1 and row["condition_number"] > 1
""",
}


def test_every_python_block_is_parsed():
    fences = re.findall(r"^[ \t]*```python[ \t]*$", TEXT, flags=re.M)
    assert len(PYTHON) == len(fences) > 0
    assert {b.lang for b in BLOCKS} <= {"", "python", "bash"}, "a block in another language would go untested"
    lines = TEXT.splitlines()
    for i, line in enumerate(lines):
        if "readme-test" in line:
            assert ANNOTATION.match(line), f"README.md:{i + 1}: malformed annotation (<!-- readme-test: ... -->)"
            after = lines[i + 1] if i + 1 < len(lines) else ""
            assert ANNOTATION.match(after) or after.strip() == "```python", \
                f"README.md:{i + 1}: an annotation must sit right above a ```python fence"


def test_a_block_without_annotation_runs_as_printed():
    plain = [b for b in PYTHON if b.annotation is None]
    assert plain, "the README should keep at least one self-contained block"
    for block in plain:
        assert prepared_source(block) == block.code
    block = Block("python", 3, "x = range(15)\n", 'setup=mnist_mlp replace "range(15)" "range(2)"')
    parse_annotation(block)
    assert prepared_source(block) == "x = range(2)\n" and block.setups == ["mnist_mlp"]
    stale = Block("python", 1, "x = 1\n", 'replace "range(15)" "range(2)"')
    parse_annotation(stale)
    with pytest.raises(AssertionError, match="stale annotation"):
        prepared_source(stale)
    with pytest.raises(ValueError, match="unknown readme-test directive 'setp=x'"):
        parse_annotation(Block("python", 1, "", "setp=x"))


def test_every_prelude_and_check_is_used():
    assert {n for b in PYTHON for n in b.setups} == set(PRELUDES)
    assert {n for b in PYTHON for n in b.checks} == set(CHECKS)


def run_source(source: str, filename: str, namespace: dict) -> None:
    """exec with the source registered, so that a traceback shows the failing line."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), namespace)


@pytest.mark.parametrize("block", PYTHON, ids=[f"python-L{b.line}" for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    unknown = [n for n in block.setups if n not in PRELUDES] + [n for n in block.checks if n not in CHECKS]
    assert not unknown, f"README.md:{block.line}: unknown setup / check names {unknown}"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    for name in block.setups:
        run_source(PRELUDES[name], f"<prelude {name}>", namespace)
    filename = f"<README.md block at line {block.line}>"
    try:
        run_source(prepared_source(block), filename, namespace)
    except Exception as error:
        tb, line = error.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == filename:
                line = block.line + tb.tb_lineno - 1
            tb = tb.tb_next
        raise AssertionError(f"README.md:{line}: {type(error).__name__}: {error}") from error
    for name in block.checks:
        run_source(CHECKS[name], f"<check {name}>", namespace)


def test_imports_named_in_the_prose_work():
    imports = re.findall(r"`(from secateurs[\w.]* import [\w, ]+)`", TEXT)
    assert imports, "the README names at least criterion_masks' module"
    for statement in imports:
        exec(statement, {})


# --- command lines of the ```bash blocks ---------------------------------------------------

COMMANDS_IN_README = command_lines(BLOCKS)
# the run directory the README's --resume / report lines name (test_the_run_directory_... checks it)
DEMO_DIR = (re.search(r"secateurs train --resume (runs/\S+)", TEXT) or [None, "runs/?"])[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.write_bytes(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.tobytes())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> a directory of the four IDX files holding the first 2048 training and 512 test
    images of that dataset (None when the dataset is not installed)."""
    from secateurs.data import load_dataset

    roots = {}
    for name in ("mnist", "fashion-mnist"):
        if name == "fashion-mnist" and not FASHION.is_dir():
            roots[name] = None
            continue
        ds = load_dataset(name)
        root = tmp_path_factory.mktemp(name)
        write_idx(root / "train-images-idx3-ubyte", ds.train_images[:2048, 0].numpy())
        write_idx(root / "train-labels-idx1-ubyte", ds.train_labels[:2048].numpy())
        write_idx(root / "t10k-images-idx3-ubyte", ds.test_images[:512, 0].numpy())
        write_idx(root / "t10k-labels-idx1-ubyte", ds.test_labels[:512].numpy())
        roots[name] = root
    return roots


class Cli:
    """Runs one README command in-process, in tmp, with its overrides."""

    def __init__(self, tmp: Path, tiny: dict, capsys):
        self.tmp, self.runs, self.tiny, self.capsys = tmp, tmp / "runs", tiny, capsys

    def data(self, name: str) -> str:
        root = self.tiny[name]
        if root is None:
            pytest.skip(f"{name} is not installed: sudo apt-get install dataset-fashion-mnist")
        return str(root)

    def __call__(self, command: str, *extra: str, replace: dict | None = None) -> str:
        from secateurs.cli import main

        for old, new in (replace or {}).items():
            assert old in command, f"{old!r} is not in the README line {command!r}"
            command = command.replace(old, new)
        argv = [a.replace("configs/", f"{REPO}/configs/", 1) if a.startswith("configs/") else a
                for a in shlex.split(command)[1:]] + list(extra)
        self.capsys.readouterr()
        code = main(argv)
        out, err = self.capsys.readouterr()
        assert code == 0, f"{command} {' '.join(extra)} exited {code}: {err}"
        return out


@pytest.fixture
def cli(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command writes by a relative path lands in the repo
    return Cli(tmp_path, tiny, capsys)


QUIET = ["--no-progress"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def run_demo(cli: Cli, command: str) -> Path:
    out = cli(command, *sets(f"data.root={cli.data('mnist')}", "train.epochs=1", "finetune.epochs=1"),
              "--runs-dir", str(cli.runs), *QUIET)
    assert "lenet300_100 on mnist — complete" in out
    (run,) = cli.runs.iterdir()
    return run


def cmd_help(cli, command):
    with pytest.raises(SystemExit) as exit_:
        cli(command)
    assert exit_.value.code == 0
    out = cli.capsys.readouterr().out
    assert all(c in out for c in ("train", "compare", "grow-prune", "oneshot", "list"))


def cmd_list(cli, command):
    out = cli(command)
    assert all(name in out for name in ("rigl", "granet", "lenet300_100", "fashion-mnist", "erk", "cubic"))


def cmd_demo(cli, command):
    run = run_demo(cli, command)
    assert run.name.startswith("demo-lenet300-mnist-")
    assert json.loads((run / "results.json").read_text())["complete"]


def cmd_resume(cli, command):
    run = run_demo(cli, "secateurs train --config configs/demo_lenet300_mnist.yaml")
    results = run / "results.json"
    results.unlink()  # as if killed before the results were written: each level resumes from its checkpoint
    out = cli(command, *QUIET, replace={DEMO_DIR: str(run)})
    assert "complete" in out and json.loads(results.read_text())["complete"]


def cmd_report(cli, command):
    run = run_demo(cli, "secateurs train --config configs/demo_lenet300_mnist.yaml")
    for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png", "results.csv"):
        (run / name).unlink()
    cli(command, replace={DEMO_DIR: str(run)})
    assert all((run / name).is_file() for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png", "results.csv"))


def train_fast(dataset, replace=None):
    def run(cli, command):
        out = cli(command, "--epochs", "1", "--finetune-epochs", "1", "--data-root", cli.data(dataset),
                  "--runs-dir", str(cli.runs), *QUIET, replace=replace)
        assert "— complete" in out
    return run


def cmd_train_cfg(cli, command):
    cfg = cli.tmp / "my.yaml"
    cfg.write_text(yaml.safe_dump({"name": "mine", "data": {"dataset": "digits"}, "train": {"epochs": 1},
                                   "prune": {"sparsities": [0.5]}}))
    out = cli(command, "--runs-dir", str(cli.runs), *QUIET, replace={"CFG.yaml": str(cfg)})
    (run,) = cli.runs.iterdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["optimizer"]["lr"] == 0.05 and config["finetune"]["epochs"] == 5 and "complete" in out


def cmd_compare(cli, command):
    # one seed, one epoch, one level; every variant, with a mask update every 4 steps
    variants = yaml.safe_load((REPO / "configs/dst_lenet5_fashion.yaml").read_text())["variants"]
    variants = [{**v, "params": {**v["params"], "every": 4}} for v in variants]
    flow = yaml.safe_dump(variants, default_flow_style=True, width=1 << 20).strip()
    out = cli(command, *sets("seeds=[0]", "base.train.epochs=1", "base.train.lr_schedule={name: constant}",
                             "base.prune.sparsities=[0.9]", f"variants={flow}"),
              "--data-root", cli.data("fashion-mnist"), "--runs-dir", str(cli.runs), *QUIET)
    assert "INCOMPLETE" not in out and all(v["label"] in out for v in variants)


def cmd_plasticity(cli, command):
    # two epochs, prune after the first by 50% or 90%, continue one epoch
    out = cli(command, *sets("prune_epochs=[1]", "ratios=[0.5, 0.9]", "continue_epochs=1", "regeneration.every=4",
                             "base.train.epochs=2", "base.train.lr_schedule={name: constant}"),
              "--data-root", cli.data("fashion-mnist"), "--runs-dir", str(cli.runs), *QUIET)
    assert "accuracy change" in out and "| 1 (0.1) |" in out


LOTTERY_FAST = sets("lottery.rounds=2", "train.epochs=1", "data.validation=512", "train.eval_every=8",
                    "lottery.supermask.sparsities=[0.5]")


def cmd_lottery(cli, command):
    seeds = [] if "--seeds" in command else ["--seeds", "0"]
    out = cli(command, *seeds, *LOTTERY_FAST, "--data-root", cli.data("mnist"), "--runs-dir", str(cli.runs), *QUIET)
    assert "INCOMPLETE" not in out


def cmd_retraining(cli, command):
    # the lottery's fast settings; one dense epoch leaves no room for the milestone
    out = cli(command, "--seeds", "0", *LOTTERY_FAST, *sets("train.lr_schedule={name: constant}"),
              "--data-root", cli.data("mnist"), "--runs-dir", str(cli.runs), *QUIET)
    assert "INCOMPLETE" not in out


def single_run(dataset, *overrides):
    def run(cli, command):
        out = cli(command, *sets(*overrides), "--data-root", cli.data(dataset), "--runs-dir", str(cli.runs), *QUIET)
        assert "wrote" in out
    return run


def cmd_search(cli, command):
    out = cli(command, *sets(
        "data.validation=256", "search_seeds=[0]", "train.epochs=1", "latency_repeats=3",
        "space.ops=[conv3, dwsep3]", "space.conv_widths=[4, 8]", "space.fc_widths=[16, 32]", "space.max_conv=2",
        "pnas.first_level=2", "pnas.k=1", "pnas.members=2", "zoo=[lenet300_100]", "grow_prune.cycles=2",
        "dnas={latency: macs, subset: 256, search: {stages: [1, 1], epochs: 2, prune_warmup_epochs: 1}}"),
        "--data-root", cli.data("fashion-mnist"), "--runs-dir", str(cli.runs), *QUIET,
        replace={"--executor processes:2": "--executor local"})
    assert "| pnas |" in out and "| dnas |" in out and "| grow_prune |" in out and "wrote" in out


TINY_LM_TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7} times" for i in range(300)) + "\n"


def tiny_lm(directory: Path) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer, saved with save_pretrained (random weights)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TINY_LM_TEXT], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=fast.eos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def cmd_oneshot_kjv(cli, command):
    import shutil

    if shutil.which("bible") is None:
        pytest.skip("the kjv corpus is not installed: sudo apt-get install bible-kjv")
    model = tiny_lm(cli.tmp / "dense")
    # the test split of the Bible is ~180k tokens here: long windows make fewer forward passes
    out = cli(command, "--nsamples", "4", "--seqlen", "256", "--runs-dir", str(cli.runs), *QUIET,
              replace={"runs/oneshot-kjv/dense": str(model)})
    assert "wanda 50%: perplexity" in out


def cmd_oneshot_files(cli, command):
    model = tiny_lm(cli.tmp / "model")
    (cli.tmp / "calib.txt").write_text(TINY_LM_TEXT)
    (cli.tmp / "test.txt").write_text(TINY_LM_TEXT[::-1])
    out = cli(command, "--nsamples", "4", "--seqlen", "32", "--runs-dir", str(cli.runs), *QUIET,
              replace={"PATH": str(model)})
    assert "sparsegpt 2:4: perplexity" in out


COMMANDS = {
    "secateurs --help": cmd_help,
    "secateurs list": cmd_list,
    "secateurs train --config configs/demo_lenet300_mnist.yaml": cmd_demo,
    "secateurs train --model lenet5 --dataset fashion-mnist --sparsity 0.9 --sparsity 0.95 --epochs 10":
        train_fast("fashion-mnist"),
    "secateurs train --config CFG.yaml --set train.optimizer.lr=0.05 --set finetune.epochs=5": cmd_train_cfg,
    f"secateurs train --resume {DEMO_DIR}": cmd_resume,
    f"secateurs report {DEMO_DIR}": cmd_report,
    "secateurs train --method rigl --model lenet5 --dataset fashion-mnist --sparsity 0.9 --set prune.params.every=100":
        train_fast("fashion-mnist", replace={"prune.params.every=100": "prune.params.every=4"}),
    "secateurs train --method snip --sparsity 0.98 --model lenet5 --dataset mnist": train_fast("mnist"),
    "secateurs compare --config configs/dst_lenet5_fashion.yaml": cmd_compare,
    "secateurs plasticity --config configs/plasticity_lenet300_fashion.yaml": cmd_plasticity,
    "secateurs lottery --config configs/lth_lenet300_mnist.yaml": cmd_lottery,
    "secateurs lottery --config configs/lth_lenet300_mnist.yaml --seeds 0 --set lottery.reset=lr_rewind": cmd_lottery,
    "secateurs lottery --config configs/imp_retraining_lenet300_mnist.yaml": cmd_retraining,
    "secateurs lottery --config configs/imp_retraining_lenet300_mnist.yaml --set lottery.reset=slr": cmd_retraining,
    "secateurs structured --config configs/structured_lenet5_mnist.yaml": single_run(
        "mnist", "train.epochs=1", "finetune.epochs=1", "structured.flops_removed=[0.5]",
        "structured.latency_repeats=1", "train.lr_schedule.name=constant"),
    "secateurs grow --config configs/growth_mlp_mnist.yaml": single_run(
        "mnist", "seeds=[0]", "train.epochs=1", "train.eval_every=8", "growth.start_step=2", "growth.every=2",
        "growth.events=2", "growth.loss_subset=256"),
    "secateurs grow-prune --config configs/grow_prune_mnist.yaml --set seed=1": single_run(
        "mnist", "cycles=2", "data.validation=512", "grow_prune.usefulness_batches=2"),
    "secateurs linearize --config configs/linearize_lenet5_mnist.yaml": single_run(
        "mnist", "train.epochs=1", "train.lr_schedule.name=constant", "snl.budgets=[0.1]", "snl.epochs=1",
        "finetune.epochs=1", "finetune.lr_schedule.name=constant"),
    "secateurs indicators --config configs/indicators_mnist.yaml": single_run(
        "mnist", "architectures=[{kind: mlp, hidden: [16]}, {kind: cnn, channels: [4]}, {kind: mlp, hidden: [8, 8]}]",
        "train_seeds=[0]", "indicators.repeats=1", "indicators.ntk_batch=16", "indicators.region_samples=64"),
    "secateurs search --config configs/search_fashion.yaml --executor processes:2": cmd_search,
    "secateurs oneshot --model runs/oneshot-kjv/dense --text kjv --method wanda --sparsity 0.5": cmd_oneshot_kjv,
    "secateurs oneshot --model PATH --calib calib.txt --eval test.txt --method sparsegpt --nm 2:4": cmd_oneshot_files,
}


def test_every_command_line_is_run_or_marked_long():
    assert len(COMMANDS_IN_README) > 10
    unmarked = {command for _, command, long in COMMANDS_IN_README if not long}
    missing = sorted(unmarked - set(COMMANDS))
    assert not missing, f"README command lines neither run here nor marked long (# ... ~N min): {missing}"
    stale = sorted(set(COMMANDS) - unmarked)
    assert not stale, f"COMMANDS entries that are no README line (or are marked long there): {stale}"


def test_the_long_lines_are_the_make_targets():
    long = [command for _, command, is_long in COMMANDS_IN_README if is_long]
    assert long == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    demo_recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, flags=re.M)[1]
    assert "secateurs train --config configs/demo_lenet300_mnist.yaml" in demo_recipe, \
        "make demo runs the README's demo command, which test_command_line runs fast"


def test_the_run_directory_in_the_readme_is_the_demos():
    from secateurs.experiments import load_config

    name = load_config(REPO / "configs/demo_lenet300_mnist.yaml").run_name()
    named = re.findall(r"runs/(demo-lenet300-mnist-[0-9a-f]+)", TEXT)
    assert len(named) >= 2 and set(named) == {name}, f"make demo writes runs/{name}"
    assert DEMO_DIR == f"runs/{name}"


@pytest.mark.parametrize("command", [pytest.param(c, id=c) for c in sorted(COMMANDS)])
def test_command_line(command, cli):
    COMMANDS[command](cli, command)
