"""Sequence-to-sequence pairs (translation, summarisation) from JSONL / CSV / TSV files, or the packaged Bible.

Files are read through `labelled.read_records`, so they get the same encoding repair as classification data.
Columns are named or guessed from the usual names (source/target, input/output, document/summary, en/es...).
A row with an empty side cannot be trained on or scored, so it is dropped and counted (`dropped_empty`) for the
caller to report; only a file with no usable pair at all is an error.

Two data names need no file: `bible-en-es` (King James -> Reina-Valera 1909, ~31k verse pairs) and `bible-es-en`
(the reverse), read from the Debian SWORD modules by `data.sword`. Their `groups` hold each pair's book, so a
held-out split can keep whole books out of training (`sword.split_by_book`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data import sword
from lmforge.data.labelled import pick_column, read_records
from lmforge.data.sword import DEFAULT_TEST_BOOKS, DEFAULT_VAL_BOOKS
from lmforge.errors import DataError

SOURCE_COLUMNS = ("source", "src", "input", "text", "document", "article", "en")
TARGET_COLUMNS = ("target", "tgt", "output", "summary", "highlights", "translation", "es")
BIBLE_DATA = {"bible-en-es": ("en", "es"), "bible-es-en": ("es", "en")}  # name -> (source, target) language


@dataclass
class PairSet:
    sources: list[str]
    targets: list[str]
    source_col: str
    target_col: str
    path: str
    dropped_empty: int = 0  # rows skipped because their source or target is empty
    groups: list[str] | None = None  # per pair, e.g. the Bible book, for splits that hold out whole groups
    repaired_rows: int = 0  # rows that were not valid UTF-8 and were decoded with a legacy encoding

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, idx: Sequence[int]) -> PairSet:
        """The pairs at `idx`; the file-level counts (dropped, repaired rows) travel along for reporting."""
        groups = [self.groups[i] for i in idx] if self.groups is not None else None
        return PairSet(
            [self.sources[i] for i in idx],
            [self.targets[i] for i in idx],
            self.source_col,
            self.target_col,
            self.path,
            self.dropped_empty,
            groups,
            self.repaired_rows,
        )


def read_pairs(path: str | Path, source_col: str | None = None, target_col: str | None = None) -> PairSet:
    """(source, target) pairs from a JSONL/CSV/TSV file, or from the Bible for `bible-en-es` / `bible-es-en`."""
    if str(path) in BIBLE_DATA and not Path(path).exists():
        return _bible(str(path), source_col, target_col)
    if str(path) == "bible-lead" and not Path(path).exists():
        return bible_lead()
    rows, columns, repaired = read_records(path)
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    scol = _column(columns, source_col, SOURCE_COLUMNS, "source", str(path))
    tcol = _column(columns, target_col, TARGET_COLUMNS, "target", str(path))
    if scol == tcol:
        raise DataError(
            f"{path}: the source and target are both column {scol!r}; pass --source-col and "
            f"--target-col (columns: {', '.join(columns)})"
        )
    sources, targets = [], []
    for r in rows:
        s, t = (r.get(scol) or "").strip(), (r.get(tcol) or "").strip()
        if s and t:
            sources.append(s)
            targets.append(t)
    if not sources:
        raise DataError(
            f"{path} has no pairs with both sides non-empty ({len(rows):,} rows, all with an empty "
            f"{scol!r} or {tcol!r})"
        )
    return PairSet(
        sources, targets, scol, tcol, str(path), dropped_empty=len(rows) - len(sources), repaired_rows=repaired
    )


def _column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    if wanted is not None and wanted not in columns:
        raise DataError(f"{path} has no column {wanted!r} (columns: {', '.join(columns)}); pass --{what}-col NAME")
    return pick_column(columns, wanted, candidates, what, path)


def _bible(name: str, source_col: str | None, target_col: str | None) -> PairSet:
    src, tgt = BIBLE_DATA[name]
    for wanted, have, what in ((source_col, src, "source"), (target_col, tgt, "target")):
        if wanted is not None and wanted != have:
            raise DataError(f"{name} has fixed columns ({src} -> {tgt}); drop --{what}-col {wanted}")
    modules = {"en": sword.KJV, "es": sword.RV1909}
    pairs = sword.bible_pairs(modules[src], modules[tgt])
    return PairSet([p.source for p in pairs], [p.target for p in pairs], src, tgt, name, groups=[p.book for p in pairs])


def bible_lead(max_words: int = 120) -> PairSet:
    """Lead generation, a summarization task on real text: for every chapter of the King James Bible, the source
    is the chapter after its first verse (cut at a verse boundary after about max_words words) and the target
    is the first verse: the chapter's opening, which usually states who acts and where ("And the LORD spake
    unto Moses, saying, ..."). Its baseline is the lead of the source (its first sentence), as news
    summarization uses the lead-3 sentences. Groups are books, so held-out books stay out of training."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in sword.read_module(sword.KJV):
        chapters.setdefault((v.book, v.chapter), []).append(v.text)
    sources, targets, groups = [], [], []
    for (book, _), verses in chapters.items():
        if len(verses) < 3:
            continue
        body, words = [], 0
        for v in verses[1:]:
            if words >= max_words:
                break
            body.append(v)
            words += len(v.split())
        sources.append(" ".join(body))
        targets.append(verses[0])
        groups.append(book)
    return PairSet(sources, targets, "rest of chapter", "first verse", "bible-lead", groups=groups)


def truncation_report(lengths: Sequence[int], limit: int, what: str, flag: str | None = None) -> str | None:
    """A one-line warning when some texts are longer than `limit` tokens, else None.

    Truncation is silent damage (a summary cut mid-sentence trains the model to stop mid-sentence), so the caller
    prints this once per set. `what` is the plural noun ("targets"); the flag defaults to --max-{what}-len with
    the noun in the singular."""
    over = sum(n > limit for n in lengths)
    if not over:
        return None
    noun = what[:-1] if what.endswith("s") else what
    flag = flag or f"--max-{noun}-len"
    verb = "is" if over == 1 else "are"
    was = "was" if over == 1 else "were"
    return (
        f"{over:,} of {len(lengths):,} {what} {verb} longer than {limit:,} tokens and {was} truncated "
        f"(raise {flag} to keep them)"
    )


def held_out_by_group(
    ps: PairSet, test: Sequence[str] | None = None, val: Sequence[str] | None = None
) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) row indices that keep whole groups out of training: for the Bible, the books
    `sword.DEFAULT_TEST_BOOKS` and `DEFAULT_VAL_BOOKS` unless given."""
    if ps.groups is None:
        raise DataError(f"{ps.path} has no groups (books) to hold out; split it at random instead")
    test_set, val_set = set(test or DEFAULT_TEST_BOOKS), set(val or DEFAULT_VAL_BOOKS)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i, g in enumerate(ps.groups):
        parts[2 if g in test_set else 1 if g in val_set else 0].append(i)
    return parts
