"""Every benchmark figure that README.md and docs/*.md state must appear in benchmarks/RESULTS.md.

    .venv/bin/python tools/doc_figures.py            # list each figure that RESULTS.md does not hold; exit 1 if any
    .venv/bin/python tools/doc_figures.py --all      # every figure found, with the RESULTS sections it was looked up in

RESULTS.md is the source of truth; tests/test_numbers.py runs `problems()`.

What counts as a figure, in the prose and tables of README.md and docs/*.md (docs/cli.md, generated from the
parser, aside), outside fenced code blocks, `inline code` and HTML comments:

- a number with a unit: `×` or `x` written right after it (1.85×), `%`, points / pts, tok/s / tokens/s, seq/s,
  sequences/s, MiB / GiB / MB / GB, ms / µs / s / seconds / minutes / min, bits per byte / bits/byte / bpb,
  GB/s, GFLOP/s;
- each number of a range or list that ends in such a unit (1.70–1.85×, 5,313 / 5,011 tok/s, −13 to −26%,
  12.5% → 42.0%);
- any number written with a decimal point (2.00, 0.688), unit or not;
- in the README's benchmark table, every number in the lmforge, peer and ratio columns.

Integers without a unit (64 questions, 100 steps, 8 × 128) are settings, not figures; dimensions written with a
spaced `×` are not ratios.

A figure matches a number of RESULTS.md written with at least as many decimals that rounds to it, signs and
thousands separators aside: 1,239 = 1239, −6.0 = 6.0, 2.00 matches 1.9996, 81.1% matches 81.11, 79% matches 78.8;
a percentage also matches a fraction (94.0% = 0.9402). Figures with decimals are thus checked closely; an integer
one (79%) only to within ±0.5 of some number of its sections, so narrow sections (a marker) make it count. The
lines giving the machine's measured peaks are not looked in, and only what is above a section's **Superseded**
line counts: a figure quoted from a superseded run is stale.

Where it is looked up:

- a README benchmark table row: the RESULTS sections whose `- command:` lines name the row's script (its last
  column);
- a block (a paragraph, a list, a table) right below a `<!-- results: KEY; KEY -->` comment, or a list item with
  such a comment at the end of a line or indented under it: the sections whose heading or `- command:` lines
  contain one of the keys (`decode_real.py`, `Muon against AdamW`);
- a block that names benchmark scripts (`benchmarks/encode.py`): the sections of those scripts;
- anything else: all of RESULTS.md above the Superseded lines.

ALLOWED lists the numbers that look like figures but are not benchmark results (versions, sizes, defaults, a test
tolerance), each with its reason; an entry exempts a figure whose line contains the entry's snippet and whose
text lies inside it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SKIP_PAGES = {"cli.md"}  # generated from the parser: flags and defaults, no measurements

# (page, snippet of the line, reason): numbers that look like figures and are not benchmark results.
ALLOWED: list[tuple[str, str, str]] = [
    ("README.md", "Python 3.10", "the oldest Python supported"),
    ("docs/getting-started.md", "Python 3.10", "the oldest Python supported"),
    ("README.md", "torch 2.13", "the torch version the figures were measured with"),
    ("docs/benchmarks.md", "torch 2.13", "the torch version the figures were measured with"),
    ("docs/getting-started.md", "4-layer GPT (4.3M", "the quickstart model's size"),
    ("docs/pretraining.md", "4-layer GPT (4.3M", "the quickstart model's size"),
    ("docs/models-and-formats.md", "(6.8M", "a preset's size"),
    ("docs/getting-started.md", "(modern spelling, 5 MB)", "a packaged corpus's size"),
    ("docs/models-and-formats.md", "(5.0 MB)", "a packaged corpus's size"),
    ("docs/models-and-formats.md", "(4.4 MB)", "a packaged corpus's size"),
    ("docs/models-and-formats.md", "d_model^-0.5", "an exponent in T5's head scaling"),
    ("docs/getting-started.md", "10–12 minutes", "how long the test suite takes, not a benchmark"),
    ("docs/getting-started.md", "within 0.5%", "a test's tolerance"),
    ("docs/fine-tuning.md", "10% + 10% by default", "the default validation / test split"),
    ("docs/fine-tuning.md", "About 0.6% of the pairs", "a property of the Bible data"),
    ("docs/pretraining.md", "a 20 ms product", "the length of `dtype: auto`'s probe"),
    ("docs/pretraining.md", "5% held out", "the default validation split"),
    ("docs/pretraining.md", "(1 GB)", "`data.tokenizer_mb`'s default"),
    ("docs/distributed.md", "1 GB by default", "`data.tokenizer_mb`'s default"),
    ("docs/pretraining.md", "15% by default: 80% become [MASK], 10% random, 10% kept", "the masked-LM defaults"),
    ("docs/pretraining.md", "(15% noise", "the span-corruption default"),
    ("docs/serving.md", "(1 MiB", "`--max-body`'s default"),
]

NUM = r"[-−+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_UNITS = (
    r"points?|pts?|tok/s|tokens/s|tokens per second|seq/s|sequences/s|MiB|GiB|MB|GB/s|GB|GFLOP/s|ms|µs|"
    r"seconds|minutes?|min|s|bits per byte|bits/byte|bpb"
)
# a unit right after the number (×, x, %), or after one space (the rest); never the start of a longer word
UNIT = rf"(?:×|x(?![\w])|%|\s(?:{_UNITS})(?![\w/]))"
# a number that is not part of a word, a version (0.2.0), a date or an exponent (1e-4)
NUMBER = re.compile(rf"(?<![\w.,/\-−+])({NUM})(?![\w.]*\d)(?!\.\w)")
JOIN = re.compile(r"\s*(?:–|-|to|/|→)\s*$")
MARKER = re.compile(r"<!--\s*results:\s*(.*?)\s*-->")
SUPERSEDED = re.compile(r"^\*\*Superseded")


@dataclass
class Figure:
    page: str
    line: int
    text: str  # as written, with its unit
    value: str  # the number alone
    context: str  # the whole line
    keys: tuple[str, ...]  # where in RESULTS to look; () = anywhere above the Superseded lines


def _plain(line: str) -> str:
    """The line without inline code and HTML comments (their numbers are commands and markers)."""
    line = re.sub(r"<!--.*?-->", " ", line)
    return re.sub(r"`[^`]*`", " ", line)


def _figures_in(text: str) -> list[tuple[str, str]]:
    """(as written, number) for each figure in one line of prose, in order."""
    found = [(m.start(), m.end(), m.group(1)) for m in NUMBER.finditer(text)]
    figure = [bool(re.match(UNIT, text[end:])) for _, end, _ in found]
    # a number joined by a dash, "to", "/" or "→" to a figure is one too (1.70–1.85×, 5,313 / 5,011 tok/s)
    for i in range(len(found) - 2, -1, -1):
        between = text[found[i][1] : found[i + 1][0]]
        if figure[i + 1] and len(between) <= 5 and JOIN.match(between):
            figure[i] = True
    out = []
    for (start, end, num), is_figure in zip(found, figure):
        if is_figure or "." in num:
            unit = re.match(UNIT, text[end:])
            out.append((text[start : end + (unit.end() if unit else 0)].strip(), num))
    return out


def _table_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _scripts_named(text: str) -> tuple[str, ...]:
    """The benchmark scripts a block names (`benchmarks/decode.py`, `decode.py`)."""
    names = dict.fromkeys(re.findall(r"\b(\w+\.py)\b", text))
    return tuple(n for n in names if (ROOT / "benchmarks" / n).is_file())


def _blocks(lines: list[str]) -> list[tuple[tuple[str, ...], list[tuple[int, str]]]]:
    """(marker keys, [(line number, line)]) for each block outside fenced code: a paragraph, a list item or a
    table row. A `<!-- results: ... -->` comment on a line of its own gives its keys to the paragraph, list or
    table right below it; one at the end of a line of text, or indented on its own line under a list item, to that
    block only."""
    blocks: list[tuple[tuple[str, ...], list[tuple[int, str]]]] = []
    fenced = False
    keys: tuple[str, ...] = ()
    current: list[tuple[int, str]] | None = None
    for n, raw in enumerate(lines, 1):
        if raw.startswith("```"):
            fenced, current = not fenced, None
            continue
        if fenced:
            continue
        marker = MARKER.search(raw)
        if marker and not MARKER.sub("", raw).strip() and not (current is not None and raw[:1].isspace()):
            keys, current = _keys(marker.group(1)), None
            continue
        if not raw.strip():
            if current is not None:  # the marker covers the next paragraph, list or table only
                keys = ()
            current = None
            continue
        starts_item = raw.lstrip().startswith(("|", "- ", "* ")) or re.match(r"\s*\d+\. ", raw)
        if current is None or starts_item:
            current = []
            blocks.append((keys, current))
        if marker:
            blocks[-1] = (_keys(marker.group(1)), current)
        current.append((n, raw))
    return blocks


def _keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(";") if k.strip())


def doc_figures(page: str, text: str) -> list[Figure]:
    """Every figure of one Markdown page (`page`: its path from the repository root), with where RESULTS.md
    should hold it."""
    out: list[Figure] = []
    columns = None  # the README benchmark table's columns, while inside it
    for marker_keys, block in _blocks(text.splitlines()):
        n, first = block[0]
        cells = _table_cells(first) if first.lstrip().startswith("|") else None
        if cells is None:
            columns = None
        elif page == "README.md" and cells[:2] == ["task", "lmforge"]:
            columns = {name: i for i, name in enumerate(cells)}
            continue
        elif set("".join(cells)) <= set("-: "):
            continue
        elif columns:
            script = re.sub(r"[`*]", "", cells[columns["command"]]).split()[0]
            for col in ("lmforge", "peer", "ratio"):
                cell = _plain(cells[columns[col]])
                for m in NUMBER.finditer(cell):
                    unit = re.match(UNIT, cell[m.end() :])
                    text = cell[m.start() : m.end() + (unit.end() if unit else 0)].strip()
                    out.append(Figure(page, n, text, m.group(1), first, (script,)))
            continue
        keys = marker_keys or _scripts_named("\n".join(line for _, line in block))
        for n, raw in block:
            for text, num in _figures_in(_plain(raw)):
                out.append(Figure(page, n, text, num, raw, keys))
    return out


def results_sections(text: str | None = None) -> list[tuple[str, str, str]]:
    """(heading, `- command:` lines, text above its Superseded line) for each `## ` section of RESULTS.md."""
    text = RESULTS.read_text() if text is None else text
    sections = []
    for chunk in re.split(r"(?m)^(?=## )", text):
        lines = chunk.splitlines()
        heading = lines[0] if lines and lines[0].startswith("## ") else ""
        kept = []
        for line in lines:
            if SUPERSEDED.match(line):
                break
            kept.append(line)
        commands = "\n".join(line for line in kept if line.startswith("- command:"))
        sections.append((heading, commands, "\n".join(kept)))
    return sections


def numbers(text: str) -> set[str]:
    """Every number written in a text, normalized: no sign, no thousands separators. The lines that give the
    machine's measured peaks are left out: the docs never quote them, and they would match figures by chance."""
    text = "\n".join(line for line in text.splitlines() if "measured peaks" not in line)
    return {m.group(1).lstrip("-−+").replace(",", "") for m in NUMBER.finditer(text)}


def _decimals(num: str) -> int:
    return len(num.split(".")[1]) if "." in num else 0


class Pool:
    """The numbers of some RESULTS.md text, and whether a figure is one of them as rounded as the figure is."""

    def __init__(self, text: str):
        self.exact = numbers(text)
        # accuracies print as fractions (0.9402) and are quoted as percentages (94.0%)
        self.percent = {str(Decimal(r) * 100) for r in self.exact if r.startswith("0.") and _decimals(r) >= 3}
        self._rounded: dict[tuple[bool, int], set[Decimal]] = {}

    def holds(self, value: str, percent: bool = False) -> bool:
        value = value.lstrip("-−+").replace(",", "")
        if value in self.exact:
            return True
        places = _decimals(value)
        if (percent, places) not in self._rounded:
            step = Decimal(1).scaleb(-places)
            source = self.exact | self.percent if percent else self.exact
            self._rounded[percent, places] = {
                Decimal(r).quantize(step, ROUND_HALF_UP) for r in source if _decimals(r) >= places
            }
        return Decimal(value) in self._rounded[percent, places]


def pages() -> dict[str, str]:
    """{path from the repository root: text} of README.md and the docs pages."""
    paths = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in SKIP_PAGES)]
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in paths}


def _allowance(fig: Figure) -> tuple[str, str, str] | None:
    for entry in ALLOWED:
        page, snippet, _ = entry
        if page == fig.page and snippet in fig.context and fig.text in snippet:
            return entry
    return None


def problems(results_text: str | None = None, docs: dict[str, str] | None = None) -> list[str]:
    """One line per figure RESULTS.md does not hold where it should, per marker key that names no section, and
    (over all pages) per allowlist entry that no longer exempts anything. `results_text` and `docs` ({page: text})
    default to the files."""
    sections = results_sections(results_text)
    pools: dict[tuple[str, ...], Pool] = {}
    out, used = [], set()
    for page, text in (pages() if docs is None else docs).items():
        for fig in doc_figures(page, text):
            entry = _allowance(fig)
            if entry is not None:
                used.add(entry)
                continue
            if fig.keys not in pools:
                chosen = [(h, c, kept) for h, c, kept in sections if any(k in h or k in c for k in fig.keys)]
                for key in fig.keys:
                    if not any(key in h or key in c for h, c, _ in chosen):
                        out.append(f"{fig.page}:{fig.line}: no RESULTS.md section's heading or command names {key!r}")
                pools[fig.keys] = Pool("\n".join(kept for _, _, kept in (chosen if fig.keys else sections)))
            if not pools[fig.keys].holds(fig.value, percent=fig.text.endswith("%")):
                where = "the sections of " + "; ".join(fig.keys) if fig.keys else "RESULTS.md"
                out.append(f"{fig.page}:{fig.line}: {fig.text!r} is not in {where} (above the Superseded lines)")
    if docs is None:
        out += [f"{p}: allowlist entry {s!r} exempts no figure" for p, s, r in ALLOWED if (p, s, r) not in used]
    return out


def main(argv: list[str]) -> int:
    if "--all" in argv:
        for page, text in pages().items():
            for fig in doc_figures(page, text):
                print(f"{fig.page}:{fig.line}: {fig.text!r} [{'; '.join(fig.keys) or 'anywhere'}]")
    found = problems()
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
