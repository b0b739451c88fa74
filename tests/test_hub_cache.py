"""Repo ids (ORG/NAME[@REVISION]) resolve to a snapshot in a fake local Hugging Face cache, never the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import ModelLoadError
from lmforge.interop.hub_cache import cache_dirs, find_cached, is_repo_id
from lmforge.interop.load import resolve_model_path

COMMIT = "a" * 40
OTHER = "b" * 40
ENV = ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No cache variable from the machine, and a HOME with an empty cache: only what a test sets is seen."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def cached_repo(
    cache: Path,
    repo: str = "org/name",
    commit: str = COMMIT,
    ref: str | None = "main",
    files: dict[str, str] | None = None,
) -> Path:
    """A repo in the hub cache layout: refs/<ref> -> commit, snapshots/<commit>/<file> -> ../../blobs/<blob>."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for i, (name, text) in enumerate((files or {"config.json": '{"model_type": "llama"}'}).items()):
        blob = root / "blobs" / f"{commit[:8]}{i:032d}"
        blob.write_text(text, encoding="utf-8")
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit, encoding="utf-8")
    return snapshot


def test_cache_dirs_order_and_dedup(monkeypatch, tmp_path):
    home = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert cache_dirs() == [home]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert cache_dirs() == [tmp_path / "a", tmp_path / "b" / "hub", tmp_path / "c" / "huggingface" / "hub", home]
    monkeypatch.setenv("HF_HUB_CACHE", str(home))  # the same directory twice is looked in once
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    assert cache_dirs() == [home, tmp_path / "b" / "hub"]


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HOME"])
def test_found_through_each_variable(monkeypatch, tmp_path, variable):
    base = tmp_path / "base"
    cache = {
        "HF_HUB_CACHE": base,
        "HF_HOME": base / "hub",
        "XDG_CACHE_HOME": base / "huggingface" / "hub",
        "HOME": base / ".cache" / "huggingface" / "hub",
    }[variable]
    snapshot = cached_repo(cache)
    assert find_cached("org/name") is None  # (nothing set yet: the test's empty HOME)
    monkeypatch.setenv(variable, str(base))
    assert find_cached("org/name") == snapshot
    assert resolve_model_path("org/name") == snapshot
    assert (snapshot / "config.json").is_symlink() and (snapshot / "config.json").read_text().startswith("{")


def test_first_cache_wins(monkeypatch, tmp_path):
    first, second = cached_repo(tmp_path / "one"), cached_repo(tmp_path / "home2" / "hub", commit=OTHER)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "one"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home2"))
    assert find_cached("org/name") == first
    monkeypatch.delenv("HF_HUB_CACHE")
    assert find_cached("org/name") == second


def test_revisions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    main = cached_repo(tmp_path)
    tagged = cached_repo(tmp_path, commit=OTHER, ref="v1.0")
    assert find_cached("org/name") == main
    assert find_cached("org/name@v1.0") == tagged == find_cached("org/name", revision="v1.0")
    assert find_cached(f"org/name@{OTHER}") == tagged  # a commit hash under snapshots/
    assert find_cached(f"org/name@{COMMIT}") == main
    assert resolve_model_path("org/name@v1.0") == tagged
    assert find_cached("org/name@v2.0") is None
    assert find_cached("org/name@../../x") is None
    pr = cached_repo(tmp_path, commit="c" * 40, ref="refs/pr/1")  # how the Hub names a pull request's ref
    assert find_cached("org/name@refs/pr/1") == pr


def test_no_refs_uses_the_only_or_newest_snapshot(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    old = cached_repo(tmp_path, ref=None)
    assert find_cached("org/name") == old
    new = cached_repo(tmp_path, commit=OTHER, ref=None)
    os.utime(old, (1_000_000, 1_000_000))
    assert find_cached("org/name") == new
    os.utime(new, (1_000, 1_000))
    assert find_cached("org/name") == old
    assert find_cached("org/name@v1.0") is None  # a named revision is never guessed


def test_incomplete_snapshots_are_not_found(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snapshot = cached_repo(tmp_path, files={"config.json": "{}", "README.md": "hi"})
    for blob in (tmp_path / "models--org--name" / "blobs").iterdir():
        blob.unlink()  # a download cut short: the symlinks dangle
    assert find_cached("org/name") is None
    cached_repo(tmp_path, repo="org/readme-only", files={"README.md": "hi"})
    assert find_cached("org/readme-only") is None
    (tmp_path / "models--org--stale" / "refs").mkdir(parents=True)  # refs/main names a snapshot that is gone
    (tmp_path / "models--org--stale" / "refs" / "main").write_text(COMMIT)
    assert find_cached("org/stale") is None
    assert snapshot.is_dir()


def test_gguf_snapshots(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    one = cached_repo(tmp_path, repo="org/one-GGUF", files={"model.Q4_0.gguf": "GGUF", "README.md": "hi"})
    assert find_cached("org/one-GGUF") == one / "model.Q4_0.gguf"
    assert resolve_model_path("org/one-GGUF") == one / "model.Q4_0.gguf"
    two = cached_repo(tmp_path, repo="org/two-GGUF", files={"a.Q4_0.gguf": "GGUF", "a.Q8_0.gguf": "GGUF"})
    assert find_cached("org/two-GGUF") == two


def test_repo_ids():
    for name in ("org/name", "HuggingFaceTB/SmolLM2-135M", "org/name@v1.0", "org/name@refs/pr/1", "a_b/c.d-e"):
        assert is_repo_id(name), name
    for name in ("name", "a/b/c", "/abs/path", "./rel", "../up", ".hidden/x", "org/", "/name", "org/..", ""):
        assert not is_repo_id(name), name


def test_missing_model_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as e:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M") in msg
    assert str(tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--HuggingFaceTB--SmolLM2-135M") in msg
    assert "smollm2-135m-instruct" in msg and "never downloads" in msg
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-135M)" in msg
    with pytest.raises(ModelLoadError, match=r"download org/name --revision v2\) or pass a directory$"):
        resolve_model_path("org/name@v2")
    # what is not a repo id keeps the path message
    with pytest.raises(ModelLoadError, match=r"model path no/such/model does not exist \(packaged models: "):
        resolve_model_path("no/such/model")


def test_an_existing_path_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cached_repo(tmp_path / "hub")
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == Path("org/name")


@pytest.fixture
def tiny_cache(tmp_path) -> Path:
    """A tiny lmforge decoder and its tokenizer, saved as the cached snapshot of org/tiny (files in blobs/)."""
    from lmforge.config import DecoderConfig
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    saved = tmp_path / "saved"
    DecoderLM(DecoderConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, max_seq_len=32)).save_pretrained(saved)
    Tokenizer.train_bpe(["some text here"] * 50, vocab_size=300).save(saved)
    cache = tmp_path / "cache"
    files = {p.name: None for p in saved.iterdir()}
    snapshot = cached_repo(cache, repo="org/tiny", files=dict.fromkeys(files, ""))
    for name in files:  # the real bytes into the blobs the snapshot links to
        (snapshot / name).resolve().write_bytes((saved / name).read_bytes())
    return cache


def test_load_pretrained_from_the_cache(monkeypatch, tiny_cache):
    import torch

    from lmforge.interop.load import load_pretrained

    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_cache))
    model, tok = load_pretrained("org/tiny")
    ids = tok.encode("some text here")
    assert tok.decode(ids) == "some text here"
    with torch.no_grad():  # (the tokenizer's vocabulary is larger than this tiny model's)
        assert model(torch.tensor([ids]) % 64).logits.shape == (1, len(ids), 64)


def test_cli_loads_from_the_cache(tiny_cache, tmp_path):
    """`lmforge convert org/tiny OUT` (which loads through load_pretrained), with only HF_HUB_CACHE set."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(HF_HUB_CACHE=str(tiny_cache), HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "convert", "org/tiny", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file()
