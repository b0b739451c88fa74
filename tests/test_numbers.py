"""Every benchmark figure README.md and docs/ state is a figure of benchmarks/RESULTS.md (issue 37, item 4).

The rules (what a figure is, where it is looked up, how it may be rounded) are in tools/doc_figures.py, which also
lists the failing figures from the command line: `.venv/bin/python tools/doc_figures.py`. RESULTS.md is the source
of truth: when a figure fails, quote the current row, or measure again and record it there.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "tools" / "doc_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


figures = _load()

RESULTS = """# Measured results

## Serving under load

- command: `.venv/bin/python benchmarks/serve_load.py`
- run: 2026-12-04, AMD EPYC, 2 threads

```
concurrent / sequential tokens/s: 3.52x
server RSS 1,249 MiB
```

---

**Superseded** (older runs):

concurrent / sequential tokens/s: 6.18x

## Sentiment

- command: `.venv/bin/python benchmarks/sentiment.py`

```
lmforge MiniLM full    0.8111    +5.1
```
"""


def _problems(doc: str, results: str = RESULTS) -> list[str]:
    return figures.problems(results_text=results, docs={"docs/page.md": doc})


def test_every_figure_in_the_readme_and_docs_is_in_results():
    found = figures.problems()
    assert not found, "figures RESULTS.md does not hold:\n" + "\n".join(found)


def test_the_readme_benchmark_table_is_checked_row_by_row():
    """Each row of the README's table is looked up in the sections of the script its last column names."""
    readme = (ROOT / "README.md").read_text()
    rows = [f for f in figures.doc_figures("README.md", readme) if f.keys]
    scripts = {f.keys[0] for f in rows}
    assert {"train_throughput.py", "decode_real.py", "serve_load.py", "long_docs.py"} <= scripts
    assert len(rows) > 60


def test_a_changed_readme_figure_fails():
    readme = (ROOT / "README.md").read_text()
    assert figures.problems(docs={"README.md": readme}) == []
    row = next(line for line in readme.splitlines() if "`speculative.py`" in line)
    assert "1.96×" in row
    changed = readme.replace(row, row.replace("1.96×", "1.97×"))
    found = figures.problems(docs={"README.md": changed})
    assert len(found) == 1 and "'1.97×'" in found[0] and "speculative.py" in found[0]
    # the same figure written in prose, outside the table, is caught too
    prose = readme + "\nPrompt lookup decodes repeated text 2.96× faster.\n"
    assert any("'2.96×'" in p for p in figures.problems(docs={"README.md": prose}))


def test_a_figure_from_a_superseded_run_fails():
    doc = "<!-- results: serve_load.py -->\n16 concurrent streams reach 6.18× the tokens/s of 16 sequential ones.\n"
    assert _problems(doc) == [
        "docs/page.md:2: '6.18×' is not in the sections of serve_load.py (above the Superseded lines)"
    ]
    assert _problems(doc.replace("6.18×", "3.52×")) == []
    assert _problems(doc.replace("6.18×", "3.5×")) == []  # rounded as the figure is written


def test_a_figure_is_looked_up_in_the_sections_its_block_names():
    # named by a marker, or by the script the paragraph cites; elsewhere the whole file
    assert _problems("<!-- results: sentiment.py -->\nIt holds 1,249 MiB.\n") != []
    assert _problems("The server (`benchmarks/sentiment.py`) holds 1,249 MiB.\n") != []
    assert _problems("The server (`benchmarks/serve_load.py`) holds 1,249 MiB.\n") == []
    assert _problems("The server holds 1,249 MiB.\n") == []
    # at the end of a list item's line, it covers that item only
    assert len(_problems("- It holds 1,249 MiB. <!-- results: sentiment.py -->\n- It holds 1,249 MiB.\n")) == 1
    assert len(_problems("- It holds 1,249 MiB.\n  <!-- results: sentiment.py -->\n- It holds 1,249 MiB.\n")) == 1
    # the marker covers one paragraph only
    assert _problems("<!-- results: sentiment.py -->\nA paragraph.\n\nThe server holds 1,249 MiB.\n") == []
    assert _problems("<!-- results: no_such_script.py -->\nIt holds 1,249 MiB.\n")[0].endswith(
        "no RESULTS.md section's heading or command names 'no_such_script.py'"
    )


@pytest.mark.parametrize(
    "written, ok",
    [
        ("81.1%", True),  # 0.8111 as a percentage, rounded
        ("81.11%", True),
        ("81.2%", False),
        ("+5.1 points", True),
        ("−5.1 points", True),  # signs aside
        ("1249 MiB", True),  # thousands separators aside
        ("3.52x", True),  # x and × alike
        ("3.53×", False),
        ("3.520×", False),  # more decimals than RESULTS has
    ],
)
def test_matching_rounds_as_the_figure_is_written(written, ok):
    doc = f"<!-- results: serve_load.py; sentiment.py -->\nThe figure: {written} here.\n"
    assert (_problems(doc) == []) is ok


@pytest.mark.parametrize(
    "line, expected",
    [
        ("1.70–1.85× / 3.87×", ["1.70", "1.85×", "3.87×"]),
        ("5,313 / 5,011 tok/s against 3,866", ["5,313", "5,011 tok/s"]),
        ("−13 to −26% at batch 1", ["−13", "−26%"]),
        ("12.5% → 42.0% in 100 steps", ["12.5%", "42.0%"]),
        ("2.00 bits per byte after 175 s", ["2.00 bits per byte", "175 s"]),
        ("a 91M model, 8 × 128 tokens, 12 x 768, 64 questions", []),
        ("version 0.2.0, lr 1e-4, Q4_1, int8, 2026-12-04", []),
    ],
)
def test_what_counts_as_a_figure(line, expected):
    assert [text for text, _ in figures._figures_in(line)] == expected


def test_code_and_comments_are_not_prose():
    doc = "Run `bench.py --rate 9.99x`.\n\n```\n8.88×\n```\n<!-- 7.77% -->\n"
    assert figures.doc_figures("docs/page.md", doc) == []


def test_the_allowlist_is_short_and_gives_reasons():
    assert len(figures.ALLOWED) <= 25
    for page, snippet, reason in figures.ALLOWED:
        assert (ROOT / page).is_file() and snippet and len(reason) > 8
    # every entry still exempts a figure of its page (problems() reports the stale ones)
    assert not [p for p in figures.problems() if "allowlist" in p]


def test_every_section_of_results_names_its_command_and_run():
    for heading, commands, kept in figures.results_sections()[1:]:
        assert commands, f"{heading}: no '- command:' line"
        assert re.search(r"(?m)^- run: .*20\d\d-\d\d-\d\d", kept), f"{heading}: no '- run:' line with a date"
        assert re.search(r"(?m)^- measured peaks: ", kept), f"{heading}: no '- measured peaks:' line"
