import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

# The test models are tiny: one intra-op thread is as fast, and it cannot spin-wait against
# other processes on a shared 2-core machine (which made the suite ~6x slower there).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# Set to 1 to skip the clean-tree check, e.g. while you edit files during a test run.
ALLOW_TREE_CHANGES = "SECATEURS_ALLOW_TREE_CHANGES"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- no test may write into the repository -------------------------------------------------

def worktree_state(root: Path) -> dict[str, str] | None:
    """What ``git status --porcelain --untracked-files=all`` lists under ``root``'s work tree:
    ``{path: "XY sha256-of-content"}`` for every changed tracked file and every untracked file
    that is not ignored. None when git is missing or ``root`` is not inside a git work tree."""
    if shutil.which("git") is None:
        return None
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=60)
        if top.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all", "-z"],
                                capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if status.returncode != 0:
        return None
    toplevel = Path(top.stdout.strip())
    entries = status.stdout.decode("utf-8", "surrogateescape").split("\0")
    state: dict[str, str] = {}
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        if "R" in code or "C" in code:
            i += 1  # with -z a rename or copy is followed by its source path
        state[path] = f"{code} {_digest(toplevel / path)}"
    return state


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"
    except OSError as err:
        return f"unreadable ({err.strerror})"


def tree_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Paths that ``after`` lists differently from ``before``: new untracked files, newly changed
    tracked files, and files already changed at the start whose content changed again. A path
    that left the list (committed or reverted by someone) is not a change the tests made."""
    return sorted(path for path, state in after.items() if before.get(path) != state)


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput") or os.environ.get(ALLOW_TREE_CHANGES) == "1":
        return
    session.config.stash[_TREE_KEY] = worktree_state(REPO)


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_TREE_KEY, None)
    if before is None:
        return
    after = worktree_state(REPO)
    changed = tree_changes(before, after) if after is not None else []
    if not changed:
        return
    listing = "\n".join(f"  {path}" for path in changed)
    message = (
        f"\nthe tests changed files under version control or left new files in the repository "
        f"(write to tmp_path instead):\n{listing}\n"
        f"(if you edited these yourself while the tests ran, rerun with {ALLOW_TREE_CHANGES}=1)\n"
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_TREE_KEY = pytest.StashKey[dict]()
