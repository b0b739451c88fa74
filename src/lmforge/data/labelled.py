"""Labelled text for classification: CSV / TSV / JSONL files -> (texts, labels), with real-world dirt handled.

Files in the wild are not always valid UTF-8: a row exported through a legacy encoding carries bytes that are
not UTF-8 (`Google\\xd5s` is Mac Roman for `Google’s`). Such rows are repaired, never dropped: each line that
is not valid UTF-8 is decoded with the single-byte encoding that reads most of them as typographic characters
(Mac Roman, Windows-1252 or Latin-1, chosen once per file), and the count of repaired rows is reported.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.assets import DATASETS, resolve_data_path
from lmforge.errors import DataError

TEXT_COLUMNS = ("text", "sentence", "content", "review", "tweet", "document", "question")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "target")
FALLBACK_ENCODINGS = ("mac_roman", "cp1252", "latin-1")
_TYPOGRAPHIC = set("’‘“”–—…éèàçñöüäâêîôû€£°")


@dataclass
class LabelledSet:
    texts: list[str]
    labels: list[str]
    source: str = ""
    repaired_rows: int = 0
    skipped_rows: int = 0  # rows with an empty text or label
    columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> LabelledSet:
        return LabelledSet([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.source)


# --------------------------------------------------------------------------------------------------------------
# decoding


def decode_lines(raw: bytes) -> tuple[list[str], set[int]]:
    """Decode a file line by line: valid UTF-8 as is, other lines repaired. Returns (lines, repaired indices)."""
    lines = raw.splitlines()  # \n, \r\n, and the lone \r of old Mac exports
    out: list[str | None] = []
    bad: list[int] = []
    for i, ln in enumerate(lines):
        try:
            out.append(ln.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
            bad.append(i)
    if bad:
        enc = _pick_fallback([lines[i] for i in bad[:2000]])
        for i in bad:
            out[i] = _repair(lines[i], enc)
    if out and out[0] is not None and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]
    return out, set(bad)  # type: ignore[return-value]


def _repair(line: bytes, encoding: str) -> str:
    """A line that is not valid UTF-8 came through a legacy single-byte encoding as a whole: decoding only its
    invalid bytes would misread legacy byte pairs that happen to form UTF-8 (Mac Roman `\xd5\xa2` is `’¢`,
    not Armenian)."""
    return line.decode(encoding, errors="replace")


def _pick_fallback(samples: list[bytes]) -> str:
    def score(enc: str) -> int:
        n = 0
        for s in samples:
            text = s.decode("utf-8", errors="ignore")
            fixed = _repair(s, enc)
            n += sum(ch in _TYPOGRAPHIC for ch in fixed) - sum(ch in _TYPOGRAPHIC for ch in text)
        return n

    return max(FALLBACK_ENCODINGS, key=score)


# --------------------------------------------------------------------------------------------------------------
# files


def read_records(path: str | Path) -> tuple[list[dict[str, str]], list[str], int]:
    """Rows of a CSV, TSV or JSONL file as dicts: (rows, column names, repaired row count)."""
    path = resolve_data_path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file; give a CSV, TSV or JSONL file")
    if not path.is_file():
        raise DataError(f"data file not found: {path} (packaged datasets: {', '.join(DATASETS)})")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; it needs a header row and at least one labelled row")
    lines, bad = decode_lines(raw)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows, repaired = [], 0
        for i, ln in enumerate(lines):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1}: not a JSON object per line ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i + 1}: each line must be a JSON object with text and label fields")
            rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
            repaired += i in bad
        columns = list(dict.fromkeys(k for r in rows for k in r))  # every key any row has, in first-seen order
        return rows, columns, repaired
    if suffix not in (".csv", ".tsv", ".tab", ".txt"):
        raise DataError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path} is empty; it needs a header row") from None
    header = [h.strip() for h in header]
    rows, repaired, start = [], 0, reader.line_num
    try:
        for rec in reader:
            end = reader.line_num
            if any(i in bad for i in range(start, end)):
                repaired += 1
            start = end
            if not rec or not any(f.strip() for f in rec):
                continue
            rows.append(dict(zip(header, rec)))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {suffix[1:].upper()} ({e})") from None
    return rows, header, repaired


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path} has no column {wanted!r}; its columns are: {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DataError(f"{path}: no {what} column found among {', '.join(columns)}; name it with --{what}-col")


def read_labelled(
    path: str | Path, text_col: str | None = None, label_col: str | None = None, require_labels: bool = True
) -> LabelledSet:
    """(texts, labels) from a CSV/TSV/JSONL file. Columns default to the usual names (text, label, sentiment...)."""
    rows, columns, repaired = read_records(path)
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    tcol = pick_column(columns, text_col, TEXT_COLUMNS, "text", str(path))
    lcol = pick_column(columns, label_col, LABEL_COLUMNS, "label", str(path)) if require_labels else None
    texts, labels, skipped = [], [], 0
    for r in rows:
        t = (r.get(tcol) or "").strip()
        lab = (r.get(lcol) or "").strip() if lcol else ""
        if not t or (lcol and not lab):
            skipped += 1
            continue
        texts.append(t)
        labels.append(lab)
    if not texts:
        raise DataError(f"{path}: every row has an empty {tcol!r}" + (f" or {lcol!r}" if lcol else ""))
    return LabelledSet(texts, labels, str(path), repaired, skipped, columns)


def read_texts(path: str | Path | None, text_col: str | None = None) -> list[str]:
    """Texts to predict or embed: a .txt file (one per line), a CSV/TSV/JSONL file (its text column), or stdin."""
    return read_text_set(path, text_col).texts


def read_text_set(path: str | Path | None, text_col: str | None = None) -> LabelledSet:
    """As `read_texts`, as a LabelledSet without labels: with the count of rows repaired from non-UTF-8 bytes,
    for the caller to report."""
    source = "standard input" if path is None or str(path) == "-" else str(path)
    if path is None or str(path) == "-":
        lines, bad = decode_lines(sys.stdin.buffer.read())
    elif Path(path).suffix.lower() == ".txt":
        if Path(path).is_dir():
            raise DataError(f"{path} is a folder; give a text file (one text per line)")
        if not Path(path).is_file():
            raise DataError(f"file not found: {path}")
        lines, bad = decode_lines(Path(path).read_bytes())
    else:
        ds = read_labelled(path, text_col=text_col, require_labels=False)
        return LabelledSet(ds.texts, [], ds.source, ds.repaired_rows, ds.skipped_rows, ds.columns)
    texts = [ln.strip() for ln in lines if ln.strip()]
    if not texts:
        raise DataError(f"no text to read from {source}")
    return LabelledSet(texts, [], source, sum(1 for i in bad if lines[i].strip()))


# --------------------------------------------------------------------------------------------------------------
# splits


def stratified_split(
    labels: list[str], val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Train / validation / test indices with each class in the same proportion in every part (per-class
    shuffles under `seed`, so the split is the same on every machine)."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    train, val, test = [], [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        test += idx[:n_test]
        val += idx[n_test : n_test + n_val]
        train += idx[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


def class_counts(labels: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))


def note_repaired(ds: LabelledSet) -> None:
    """Say on stderr how many rows were repaired from non-UTF-8 bytes (repaired, not dropped: see decode_lines)."""
    if ds.repaired_rows:
        print(
            f"lmforge: {ds.source}: {ds.repaired_rows} row{'s' if ds.repaired_rows != 1 else ''} repaired from "
            "non-UTF-8 bytes (decoded with a legacy single-byte encoding)",
            file=sys.stderr,
        )


def input_texts(path: str | Path | None, texts: list[str] | None = None, text_col: str | None = None) -> list[str]:
    """`predict` / `embed` input: the given texts, or those of a .txt file (a text per line), a CSV/TSV/JSONL
    file's text column, or standard input (None or "-"); not both."""
    if texts:
        if path not in (None, "-"):
            raise DataError(f"give the texts with --text or in the input file {path}, not both")
        if text_col:
            raise DataError("--text-col names the text column of an input file; with --text there is none: drop it")
        return list(texts)
    ds = read_text_set(path, text_col)
    note_repaired(ds)
    return ds.texts
