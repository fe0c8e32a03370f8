"""The session guard in conftest.py: a test run must leave the repository as it found it. Its
helpers are tested here on a throwaway git repository."""
import shutil
import subprocess

import pytest

from conftest import tree_changes, worktree_state

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / ".gitignore").write_text("runs/\n")
    (root / "tracked.txt").write_text("v1\n")
    (root / "edited.txt").write_text("v1\n")
    (root / "old.txt").write_text("old\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    return root


def test_only_changes_made_after_the_snapshot_are_reported(repo):
    (repo / "edited.txt").write_text("edited before the session\n")  # already dirty at the start
    (repo / "notes.txt").write_text("an untracked file from before\n")
    before = worktree_state(repo)
    assert set(before) == {"edited.txt", "notes.txt"}

    (repo / "runs").mkdir()
    (repo / "runs" / "out.json").write_text("{}")  # ignored: never reported
    assert tree_changes(before, worktree_state(repo)) == []

    (repo / "tracked.txt").write_text("v2\n")  # a tracked file the session changed
    (repo / "sub").mkdir()
    (repo / "sub" / "new.json").write_text("{}")  # a new file in a new folder (--untracked-files=all)
    (repo / "edited.txt").write_text("edited again during the session\n")  # same status, new content
    git(repo, "mv", "old.txt", "renamed.txt")  # a rename: one entry, then its source
    assert tree_changes(before, worktree_state(repo)) == ["edited.txt", "renamed.txt", "sub/new.json", "tracked.txt"]


def test_a_file_that_became_clean_is_not_a_change(repo):
    (repo / "edited.txt").write_text("dirty\n")
    before = worktree_state(repo)
    git(repo, "commit", "-q", "-am", "someone else committed it")
    assert worktree_state(repo) == {}
    assert tree_changes(before, {}) == []


def test_outside_a_work_tree_there_is_no_state(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert worktree_state(plain) is None
