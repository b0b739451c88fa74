"""Corpus cleaning before pre-training: quality rules, exact and near-duplicate removal, a report of each.

A corpus (names, files, folders or globs, as pre-training reads them: `data.corpus`) is read one document at a
time, and each document goes through, in order:

    lines      line rules in the style of C4's (boilerplate: cookie and privacy notices, "lorem ipsum",
               javascript warnings; optionally lines without terminal punctuation or with too few words,
               which verse would not survive, so off by default): matching lines are dropped from the text
    quality    document rules in the style of Gopher's quality filter (Rae et al. 2021): word count, mean word
               length, symbol-to-word ratio, share of digits, share of words with a letter, stop words, bullet
               and ellipsis lines
    repetition Gopher's repetition rules: duplicate lines and paragraphs (by count and by characters), the most
               frequent 2-4-gram's share of characters, and the share of characters in repeated 5-10-grams
    exact      a document whose normalised text (NFKC, lower case, whitespace collapsed) was seen before
    near       a document whose word-trigram MinHash (datasketch) finds an earlier kept one with an estimated
               Jaccard similarity of at least `near_threshold` (LSH for the candidates, then the estimate)

Every rule can be turned off (`skip`). The first document of a duplicate group is kept (the order of the sources
as given, then file names), so `clean(["shakespeare", "shakespeare-folio"])` keeps the modern spelling. Nothing but
one document's text, the hashes and the MinHash index is held at once: a corpus larger than memory streams.

The defaults are Gopher's thresholds except where a rule would remove a good document of the packaged corpora
(a play's repeated speaker names put up to 30% of its lines among the repeated ones: the limit is 40% here).
The near-duplicate threshold, 0.15 of word trigrams with 256 permutations, finds editions of one text in another
spelling (the First Folio against a modern edition shares 0.23-0.35 of its trigrams, two different plays at
most 0.02); a web corpus whose pages share templates may want it higher (--near-threshold 0.5).
"""

from __future__ import annotations

import hashlib
import html
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import require
from lmforge.config import check_settings, setting, setting_name
from lmforge.data.corpus import Document, scan_documents
from lmforge.errors import ConfigError, DataError
from lmforge.files import check_out_dir, write_json, write_text

RULES = (
    "boilerplate",
    "terminal_punct",
    "short_lines",
    "words",
    "word_length",
    "symbols",
    "digits",
    "alpha",
    "stop_words",
    "bullets",
    "ellipsis",
    "dup_lines",
    "dup_paragraphs",
    "top_ngrams",
    "dup_ngrams",
    "exact",
    "near",
)
LINE_RULES = ("boilerplate", "terminal_punct", "short_lines")
OFF_BY_DEFAULT = ("terminal_punct", "short_lines")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
BOILERPLATE = re.compile(
    r"lorem ipsum|javascript|cookie policy|use of cookies|uses cookies|privacy policy|terms of use|"
    r"terms and conditions|all rights reserved",
    re.IGNORECASE,
)
BULLETS = ("•", "●", "○", "▪", "■", "◦", "‣", "⁃", "-", "*")
CLEAN_DIR = "clean"  # where a pre-training run with data.clean keeps its cleaned corpus
EXAMPLES = 3  # examples kept per rule for the report
EXAMPLE_CHARS = 200


@dataclass
class CleanConfig:
    """The rules' thresholds (Gopher's unless said otherwise) and which rules to skip."""

    skip: tuple[str, ...] = setting(OFF_BY_DEFAULT, "rules turned off")
    min_words: int = setting(50, "fewest words a document may have", low=0, integer=True)
    max_words: int = setting(100_000, "most words a document may have", low=1, integer=True)
    min_word_length: float = setting(3.0, "shortest mean word length", low=0)
    max_word_length: float = setting(10.0, "longest mean word length", low=0)
    max_symbol_ratio: float = setting(0.1, "'#' and '...' per word at most", low=0)
    max_digit_ratio: float = setting(0.2, "share of characters that are digits at most", low=0, high=1)
    min_alpha_words: float = setting(0.8, "share of words with a letter at least", low=0, high=1)
    min_stop_words: int = setting(2, "distinct English stop words at least (the, be, to, of, ...)", low=0)
    max_bullet_lines: float = setting(0.9, "share of lines starting with a bullet at most", low=0, high=1)
    max_ellipsis_lines: float = setting(0.3, "share of lines ending with an ellipsis at most", low=0, high=1)
    max_dup_lines: float = setting(
        0.4,
        "share of lines that repeat an earlier line at most (Gopher: 0.3; a play's speaker names reach 0.3)",
        low=0,
        high=1,
    )
    max_dup_line_chars: float = setting(0.2, "share of characters in repeated lines at most", low=0, high=1)
    max_dup_paragraphs: float = setting(0.3, "share of paragraphs that repeat an earlier one at most", low=0, high=1)
    max_dup_paragraph_chars: float = setting(0.2, "share of characters in repeated paragraphs", low=0, high=1)
    min_line_words: int = setting(3, "short_lines: fewest words a line may have", low=0, integer=True)
    near_threshold: float = setting(0.15, "estimated Jaccard of word trigrams that makes a near-duplicate", low=0)
    num_perm: int = setting(
        256, "MinHash permutations (the estimate's error falls as 1 / sqrt of it)", low=16, integer=True
    )
    top_ngram: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram: dict[int, float] = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    def validate(self) -> None:
        unknown = [r for r in self.skip if r not in RULES]
        if unknown:
            raise ConfigError(f"unknown cleaning rule {', '.join(unknown)}; the rules: {', '.join(RULES)}")
        check_settings(self, setting_name)
        if not 0 < self.near_threshold <= 1:
            raise ConfigError(f"near_threshold (--near-threshold) must be in (0, 1], got {self.near_threshold}")


def rules_off(skip: str | None = None, enable: str | None = None) -> tuple[str, ...]:
    """CleanConfig.skip from `--skip a,b` (rules to turn off) and `--enable c` (rules off by default to turn on)."""

    def names(v: str | None) -> set[str]:
        return {r.strip().replace("-", "_") for r in (v or "").split(",") if r.strip()}

    off = (set(OFF_BY_DEFAULT) - names(enable)) | names(skip)
    unknown = sorted((names(skip) | names(enable)) - set(RULES))
    if unknown:
        raise ConfigError(f"unknown cleaning rule {', '.join(unknown)}; the rules: {', '.join(RULES)}")
    return tuple(r for r in RULES if r in off)


# --------------------------------------------------------------------------------------------------------------
# the rules


def words_of(text: str) -> list[str]:
    return text.split()


def normalise(text: str) -> str:
    """What exact deduplication compares: NFKC, lower case, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def clean_lines(text: str, cfg: CleanConfig) -> tuple[str, dict[str, list[str]]]:
    """The text without the lines the line rules drop; the dropped lines by rule."""
    on = [r for r in LINE_RULES if r not in cfg.skip]
    if not on:
        return text, {}
    kept, dropped = [], {}
    for line in text.split("\n"):
        s = line.strip()
        rule = None
        if s:
            if "boilerplate" in on and BOILERPLATE.search(s):
                rule = "boilerplate"
            elif "terminal_punct" in on and not s.endswith((".", "!", "?", '"', "'", ":", ";", ")", "]")):
                rule = "terminal_punct"
            elif "short_lines" in on and len(s.split()) < cfg.min_line_words:
                rule = "short_lines"
        if rule is None:
            kept.append(line)
        else:
            dropped.setdefault(rule, []).append(s)
    return "\n".join(kept), dropped


def quality(text: str, cfg: CleanConfig) -> tuple[str, str] | None:
    """The first document rule the text fails, as (rule, why), or None."""
    skip = cfg.skip
    words = words_of(text)
    n = len(words)
    if "words" not in skip and not cfg.min_words <= n <= cfg.max_words:
        return "words", f"{n} words (allowed {cfg.min_words}..{cfg.max_words})"
    if not n:
        return None
    mean = sum(len(w) for w in words) / n
    if "word_length" not in skip and not cfg.min_word_length <= mean <= cfg.max_word_length:
        return "word_length", f"mean word length {mean:.1f}"
    symbols = (text.count("#") + text.count("...") + text.count("…")) / n
    if "symbols" not in skip and symbols > cfg.max_symbol_ratio:
        return "symbols", f"{symbols:.2f} '#' or '...' per word"
    chars = sum(not c.isspace() for c in text) or 1
    digits = sum(c.isdigit() for c in text) / chars
    if "digits" not in skip and digits > cfg.max_digit_ratio:
        return "digits", f"{digits:.0%} of characters are digits"
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n
    if "alpha" not in skip and alpha < cfg.min_alpha_words:
        return "alpha", f"{alpha:.0%} of words have a letter"
    stops = len(STOP_WORDS & {w.lower().strip(".,;:!?\"'()") for w in words})
    if "stop_words" not in skip and stops < cfg.min_stop_words:
        return "stop_words", f"{stops} of the stop words {sorted(STOP_WORDS)}"
    lines = [s for s in (x.strip() for x in text.split("\n")) if s]
    if lines and "bullets" not in skip:
        share = sum(s.startswith(BULLETS) for s in lines) / len(lines)
        if share > cfg.max_bullet_lines:
            return "bullets", f"{share:.0%} of lines start with a bullet"
    if lines and "ellipsis" not in skip:
        share = sum(s.endswith(("...", "…")) for s in lines) / len(lines)
        if share > cfg.max_ellipsis_lines:
            return "ellipsis", f"{share:.0%} of lines end with an ellipsis"
    return repetition(text, lines, words, cfg)


def _dup_share(parts: list[str]) -> tuple[float, float]:
    """(share of parts that repeat an earlier one, share of characters in those repeats)."""
    seen: set[str] = set()
    dup = dup_chars = total = 0
    for p in parts:
        total += len(p)
        if p in seen:
            dup += 1
            dup_chars += len(p)
        seen.add(p)
    return dup / max(len(parts), 1), dup_chars / max(total, 1)


def repetition(text: str, lines: list[str], words: list[str], cfg: CleanConfig) -> tuple[str, str] | None:
    """Gopher's repetition rules (the shares of characters count the n-grams' words without spaces)."""
    skip = cfg.skip
    if "dup_lines" not in skip and lines:
        share, chars = _dup_share(lines)
        if share > cfg.max_dup_lines or chars > cfg.max_dup_line_chars:
            return "dup_lines", f"{share:.0%} of lines ({chars:.0%} of characters) repeat earlier ones"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if "dup_paragraphs" not in skip and paragraphs:
        share, chars = _dup_share(paragraphs)
        if share > cfg.max_dup_paragraphs or chars > cfg.max_dup_paragraph_chars:
            return "dup_paragraphs", f"{share:.0%} of paragraphs ({chars:.0%} of characters) repeat earlier ones"
    low = [w.lower() for w in words]
    total = sum(len(w) for w in low) or 1
    if "top_ngrams" not in skip:
        for n, limit in cfg.top_ngram.items():
            grams = Counter(tuple(low[i : i + n]) for i in range(len(low) - n + 1))
            if grams:
                gram, count = grams.most_common(1)[0]
                share = count * sum(len(w) for w in gram) / total
                if count > 1 and share > limit:
                    return "top_ngrams", f"the {n}-gram {' '.join(gram)!r} is {share:.0%} of the characters"
    if "dup_ngrams" not in skip:
        for n, limit in cfg.dup_ngram.items():
            share = _dup_ngram_chars(low, n) / total
            if share > limit:
                return "dup_ngrams", f"{share:.0%} of the characters are in repeated {n}-grams"
    return None


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by an n-gram seen earlier in the text (each word counted once)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if g in seen:
            for j in range(i, i + n):
                covered[j] = True
        seen.add(g)
    return sum(len(w) for w, c in zip(words, covered) if c)


def shingles(text: str, n: int = 3) -> set[bytes]:
    """The word n-grams of a text (lower case, letters and digits only), as bytes for MinHash."""
    words = re.sub(r"[^\w\s]", " ", unicodedata.normalize("NFKC", text).lower()).split()
    return {" ".join(words[i : i + n]).encode() for i in range(max(len(words) - n + 1, 1))} if words else set()


# --------------------------------------------------------------------------------------------------------------
# the pass over a corpus


@dataclass
class CleanReport:
    """What a cleaning pass did: documents and bytes in and out, and per rule how many documents (or lines) it
    removed, with a few examples (a document's name and why, or the line)."""

    documents: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # documents per document rule, lines per line rule
    examples: dict[str, list[str]] = field(default_factory=dict)
    duplicates: list[tuple[str, str, float]] = field(default_factory=list)  # (removed, the kept one, similarity)
    kept_names: list[str] = field(default_factory=list)

    def add(self, rule: str, example: str, count: int = 1) -> None:
        self.removed[rule] = self.removed.get(rule, 0) + count
        ex = self.examples.setdefault(rule, [])
        if len(ex) < EXAMPLES:
            ex.append(example[:EXAMPLE_CHARS])

    def summary(self) -> str:
        lines = [
            f"documents: {self.documents} in, {self.kept} kept; bytes: {self.bytes_in:,} in, {self.bytes_out:,} kept "
            f"({self.bytes_out / max(self.bytes_in, 1):.1%})"
        ]
        for rule in RULES:
            if rule in self.removed:
                unit = "lines" if rule in LINE_RULES else "documents"
                lines.append(f"  {rule:<15} {self.removed[rule]:>7,} {unit}  e.g. {self.examples[rule][0]!r}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "kept": self.kept,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "removed": self.removed,
            "examples": self.examples,
            "duplicates": [{"removed": a, "kept": b, "similarity": round(s, 4)} for a, b, s in self.duplicates],
        }


class Cleaner:
    """The rules over a stream of documents: `feed(name, text)` returns the cleaned text, or None when the
    document is removed; `report` says what each rule did."""

    def __init__(self, cfg: CleanConfig | None = None) -> None:
        self.cfg = cfg or CleanConfig()
        self.cfg.validate()
        self.report = CleanReport()
        self.seen: set[bytes] = set()
        self.near = None
        if "near" not in self.cfg.skip:
            datasketch = require("datasketch", "near-duplicate removal (data clean)", "data")
            self._minhash = datasketch.MinHash
            self.near = datasketch.MinHashLSH(threshold=self.cfg.near_threshold, num_perm=self.cfg.num_perm)
            self.signatures: dict[str, Any] = {}

    def feed(self, name: str, text: str) -> str | None:
        r, cfg = self.report, self.cfg
        r.documents += 1
        r.bytes_in += len(text.encode("utf-8"))
        text, dropped = clean_lines(text, cfg)
        for rule, lines in dropped.items():
            for line in lines:
                r.add(rule, line)
        failed = quality(text, cfg)
        if failed is not None:
            r.add(failed[0], f"{name}: {failed[1]}")
            return None
        if "exact" not in cfg.skip:
            digest = hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()
            if digest in self.seen:
                r.add("exact", name)
                return None
            self.seen.add(digest)
        if self.near is not None:
            m = self._minhash(num_perm=cfg.num_perm, seed=1)
            m.update_batch(list(shingles(text)))
            best = max(((self.signatures[k].jaccard(m), k) for k in self.near.query(m)), default=None)
            if best is not None and best[0] >= cfg.near_threshold:
                r.add("near", f"{name} ~ {best[1]} ({best[0]:.2f})")
                r.duplicates.append((name, best[1], best[0]))
                return None
            self.near.insert(name, m)
            self.signatures[name] = m
        r.kept += 1
        r.bytes_out += len(text.encode("utf-8"))
        r.kept_names.append(name)
        return text


def _out_name(doc: Document, taken: set[str]) -> str:
    """The file a kept document is written to: its own file name (a block of one large file: NAME-BLOCK.txt),
    made unique where two sources share a name."""
    path, _, block = doc.name.partition("#")
    p = Path(path)
    name = f"{p.stem}-{block}{p.suffix or '.txt'}" if block else p.name
    stem, i = name, 2
    while name in taken:
        name = f"{Path(stem).stem}-{i}{Path(stem).suffix}"
        i += 1
    taken.add(name)
    return name


def clean_corpus(
    sources: list[str], out: str | Path, cfg: CleanConfig | None = None, progress: bool | None = None
) -> CleanReport:
    """Clean a corpus into the folder `out`: each kept document as a text file (its own file name), and
    `clean_report.json` + `clean_report.html` (names a corpus reader skips): documents and bytes in and out,
    what each rule removed, examples, and every near-duplicate pair with its similarity. `out` is then a corpus
    pre-training reads (`data.sources`)."""
    from tqdm import tqdm

    out = check_out_dir(Path(out))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose a new --out")
    docs = scan_documents(list(sources))
    cleaner = Cleaner(cfg)
    taken: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    show = progress if progress is not None else sys.stderr.isatty()
    for d in tqdm(docs, desc="cleaning", unit="doc", disable=not show):
        text = cleaner.feed(d.name, d.read())
        if text is not None:
            write_text(out / _out_name(d, taken), text)
    report = cleaner.report
    write_json(out / "clean_report.json", report.to_json())
    write_text(out / "clean_report.html", report_html(report, sources))
    if not report.kept:
        raise DataError(
            f"cleaning kept none of the {report.documents} documents of {', '.join(map(str, sources))} "
            f"(what each rule removed: {out / 'clean_report.html'}); turn a rule off with --skip RULE"
        )
    return report


def report_html(r: CleanReport, sources: list[str]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{rule}</td><td>{r.removed[rule]:,} {'lines' if rule in LINE_RULES else 'documents'}</td>"
        f"<td>{'<br>'.join(e(x) for x in r.examples[rule])}</td></tr>"
        for rule in RULES
        if rule in r.removed
    )
    pairs = "".join(f"<li>{e(Path(a).name)} ~ {e(Path(b).name)}: {s:.2f}</li>" for a, b, s in r.duplicates)
    return (
        f"<!doctype html><meta charset='utf-8'><title>Cleaning report</title>"
        f"<h1>Cleaning report: {e(', '.join(map(str, sources)))}</h1>"
        f"<p>{r.documents} documents in, {r.kept} kept; {r.bytes_in:,} bytes in, {r.bytes_out:,} kept.</p>"
        f"<table border=1 cellpadding=4><tr><th>rule</th><th>removed</th><th>examples</th></tr>{rows}</table>"
        + (
            f"<h2>Near-duplicates (removed ~ kept: estimated Jaccard of word trigrams)</h2><ul>{pairs}</ul>"
            if pairs
            else ""
        )
    )
