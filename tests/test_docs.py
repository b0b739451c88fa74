"""The documentation: README.md and docs/ (the mkdocs site).

- docs/cli.md is generated from lmforge's argparse parser (tools/cli_reference.py) and must equal a fresh
  generation;
- `mkdocs build --strict` passes: a broken link or anchor, or a page left out of mkdocs.yml's nav, fails it;
- every code block marked runnable (`<!-- runnable -->` on the line just above its ```bash or ```python fence) runs
  at toy size, the blocks of one page in order in one fresh folder (with configs/ beside them, as in a clone);
- the README reads in five minutes: at most 250 lines, and one block near the top with exactly the two set-up
  commands the CI runs, `make quickstart` and `make test`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
BLOCK_TIMEOUT = 120  # seconds; the blocks are chosen to take well under 30 on 2 cores
FENCE = re.compile(r"^```(\w*)")


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """(line number of the fence, language, code, runnable) for each fenced block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{start + 1}: a code block is never closed"
        runnable = start > 0 and lines[start - 1].strip() == MARKER
        blocks.append((start + 1, lang, "\n".join(lines[start + 1 : end]), runnable))
        i = end + 1
    return blocks


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_cli_reference_is_current():
    ref = _cli_reference()
    fresh = ref.render()
    current = (DOCS / "cli.md").read_text(encoding="utf-8") if (DOCS / "cli.md").exists() else ""
    assert current == fresh, f"docs/cli.md is stale (the CLI changed): regenerate it with {ref.REGENERATE}"


def test_cli_reference_lists_every_verb_and_flag():
    """Every verb and sub-verb of the parser has a section, and every flag appears in it."""
    import argparse

    from lmforge.cli import build_parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    for parser in list(walk(build_parser()))[1:]:
        assert f"# {parser.prog}\n" in text, f"docs/cli.md has no section for {parser.prog}"
        section = text.split(f"# {parser.prog}\n", 1)[1].split("\n#", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, f"docs/cli.md: {parser.prog} lacks {flag}"


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (they come with the [dev] extra)")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run(cmd + ["-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, "mkdocs build --strict failed:\n" + r.stdout[-3000:] + r.stderr[-3000:]


def test_runnable_markers_sit_on_code_blocks():
    for path in markdown_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() == MARKER:
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                m = FENCE.match(nxt)
                assert m and m.group(1) in ("bash", "sh", "python"), (
                    f"{path.name}:{i + 1}: {MARKER} must sit just above a ```bash or ```python block"
                )


RUNNABLE = [p for p in markdown_files() if any(b[3] for b in code_blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_runnable_blocks(page, tmp_path):
    """Each page's runnable blocks, in order, in one fresh folder; `lmforge` and `python` from this interpreter."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}
    for line, lang, code, runnable in code_blocks(page):
        if not runnable:
            continue
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang in ("bash", "sh") else [sys.executable, "-c", code]
        start = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{page.name}:{line}: the block ran over {BLOCK_TIMEOUT} s:\n{code}")
        took = time.monotonic() - start
        assert r.returncode == 0, (
            f"{page.name}:{line}: the block failed (exit {r.returncode}, {took:.0f} s):\n"
            f"{code}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-2000:]}"
        )


def test_readme_reads_in_five_minutes():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; at most 250 (move the detail to docs/)"

    def commands(code: str) -> list[str]:
        return [c for c in (ln.split("#", 1)[0].strip() for ln in code.splitlines()) if c]

    setup = [
        (line, code)
        for line, _, code, _ in code_blocks(README)
        if {"make quickstart", "make test"} & set(commands(code))
    ]
    assert len(setup) == 1, "README.md: `make quickstart` and `make test` belong in one block, once"
    line, code = setup[0]
    assert commands(code) == ["make quickstart", "make test"], (
        f"README.md:{line}: the set-up block holds exactly `make quickstart` and `make test`, got {commands(code)}"
    )
    assert line <= 15, f"README.md:{line}: the set-up block must sit near the top (by line 15)"


def test_readme_links_resolve():
    """The README is not part of the site, so mkdocs does not check its links: every relative one must exist."""
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
