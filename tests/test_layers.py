"""The library layer imports only torch and numpy: a user can drop it into any trainer."""
import subprocess
import sys

LIBRARY = [
    "secateurs", "secateurs.masks", "secateurs.scores", "secateurs.allocation", "secateurs.schedules",
    "secateurs.engine", "secateurs.regrowth", "secateurs.resets", "secateurs.methods", "secateurs.analysis.flops",
    "secateurs.granularity", "secateurs.criteria", "secateurs.analysis.mask_metrics", "secateurs.structured",
    "secateurs.grow", "secateurs.linearize", "secateurs.analysis.indicators", "secateurs.streaks",
    "secateurs.atomic", "secateurs.search", "secateurs.search.space", "secateurs.search.cost", "secateurs.search.pnas", "secateurs.search.dnas",
]
FORBIDDEN = ["secateurs.data", "secateurs.models", "secateurs.train", "secateurs.experiments", "secateurs.cli",
             "tqdm", "matplotlib", "yaml"]


def test_library_never_imports_the_experiment_layer():
    code = (
        "import sys, numpy, torch\n"
        "before = set(sys.modules)  # whatever torch itself pulls in (it imports tqdm) is not ours\n"
        f"for m in {LIBRARY!r}: __import__(m)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules and m not in before]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the library imported {out}"
