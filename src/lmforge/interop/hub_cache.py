"""Models already in the local Hugging Face cache, found by repo id (`ORG/NAME`, `ORG/NAME@REVISION`).

lmforge never downloads: a model that `huggingface-cli download` (or transformers) has fetched is used where it
lies, offline. The cache is read with the standard library, so huggingface_hub is not needed at run time. Its
layout, in each cache directory:

    models--ORG--NAME/refs/<revision>          a commit hash (refs/main: the default branch)
    models--ORG--NAME/snapshots/<hash>/...     that commit's files, often symlinks into blobs/
    models--ORG--NAME/blobs/<sha>              the file contents
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# ORG/NAME, optionally @REVISION; ORG and NAME as the Hub spells them (letters, digits, "-", "_", ".")
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9_-][\w.-]*/[\w.-]+)(?:@(?P<revision>.+))?$")


def cache_dirs() -> list[Path]:
    """The hub cache directories to look in, first first: $HF_HUB_CACHE, $HF_HOME/hub,
    $XDG_CACHE_HOME/huggingface/hub (each where set), then ~/.cache/huggingface/hub."""
    env = os.environ
    dirs = [
        env.get("HF_HUB_CACHE") or None,
        env.get("HF_HOME") and os.path.join(env["HF_HOME"], "hub"),
        env.get("XDG_CACHE_HOME") and os.path.join(env["XDG_CACHE_HOME"], "huggingface", "hub"),
        os.path.join("~", ".cache", "huggingface", "hub"),
    ]
    out: list[Path] = []
    for d in dirs:
        if d:
            p = Path(d).expanduser()
            if p not in out:
                out.append(p)
    return out


def split_repo_id(repo_id: str, revision: str = "main") -> tuple[str, str]:
    """("ORG/NAME", revision) from "ORG/NAME" or "ORG/NAME@REVISION" (the @ wins over the revision given)."""
    repo, _, rev = repo_id.partition("@")
    return repo, rev or revision


def is_repo_id(name: str) -> bool:
    """Whether a string names a Hub repo (ORG/NAME, exactly one slash, optional @REVISION) and not a file."""
    m = REPO_ID.match(name)
    return m is not None and m["repo"].split("/")[1] not in (".", "..") and not Path(name).exists()


def repo_dirs(repo_id: str) -> list[Path]:
    """Where a repo would lie in each cache directory (models--ORG--NAME), whether or not it is there."""
    repo, _ = split_repo_id(repo_id)
    return [d / ("models--" + repo.replace("/", "--")) for d in cache_dirs()]


def find_cached(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot of a repo at a revision (a branch or tag with a refs/ file, or a commit hash under
    snapshots/): its directory if it holds a config.json; its .gguf file if it holds exactly one (the directory
    if several); None if no cache directory has it. Without a refs/main, the only snapshot (or the newest)."""
    repo, revision = split_repo_id(repo_id, revision)
    if ".." in Path(revision).parts or Path(revision).is_absolute():
        return None
    for d in repo_dirs(repo):
        snapshot = _snapshot(d, revision)
        if snapshot is None:
            continue
        if (snapshot / "config.json").is_file():  # (is_file follows the symlink: a missing blob is no file)
            return snapshot
        ggufs = sorted(p for p in snapshot.glob("*.gguf") if p.is_file())
        if ggufs:
            return ggufs[0] if len(ggufs) == 1 else snapshot
    return None


def _snapshot(repo_dir: Path, revision: str) -> Path | None:
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        return snapshots / commit if commit and (snapshots / commit).is_dir() else None
    if (snapshots / revision).is_dir():  # a commit hash
        return snapshots / revision
    if revision != "main" or not snapshots.is_dir():
        return None
    # no refs/main (downloaded by commit hash): the only snapshot, or the newest
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
