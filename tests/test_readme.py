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

A block without an annotation runs exactly as printed. A failure names the README line. Hugging Face models are built from configs with random weights: nothing downloads.

**Command lines.** A line of a ```bash block that starts with ``secateurs``, ``make`` or
``python`` either has an entry in ``COMMANDS`` (run in-process with overrides that make it
take seconds: tiny subsets of the datasets written to tmp, one epoch, one seed, run
directories in tmp), or ends in a comment with its measured time (``# ... ~70 s``), which marks
it long. ``test_every_command_line_is_run_or_marked_long`` checks that the two sets cover the
README exactly.
"""
from __future__ import annotations

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


@pytest.mark.parametrize("block", PYTHON, ids=[f"python-L{b.line}" for b in PYTHON])
def test_python_block_runs(block, tmp_path, monkeypatch):
    unknown = [n for n in block.setups if n not in PRELUDES] + [n for n in block.checks if n not in CHECKS]
    assert not unknown, f"README.md:{block.line}: unknown setup / check names {unknown}"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    for name in block.setups:
        exec(compile(PRELUDES[name], f"<prelude {name}>", "exec"), namespace)
    source = prepared_source(block)
    filename = f"<README.md block at line {block.line}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        exec(compile(source, filename, "exec"), namespace)
    except Exception as error:
        tb, line = error.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == filename:
                line = block.line + tb.tb_lineno - 1
            tb = tb.tb_next
        raise AssertionError(f"README.md:{line}: {type(error).__name__}: {error}") from error
    for name in block.checks:
        exec(compile(CHECKS[name], f"<check {name}>", "exec"), namespace)


def test_imports_named_in_the_prose_work():
    imports = re.findall(r"`(from secateurs[\w.]* import [\w, ]+)`", TEXT)
    assert imports, "the README names at least criterion_masks' module"
    for statement in imports:
        exec(statement, {})
