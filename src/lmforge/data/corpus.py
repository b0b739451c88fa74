"""Corpora: packaged names, files, folders and globs -> documents -> a deterministic train/validation split.

A document is one file. The split is by document, so no play (say) is half in training and half in validation:
documents are ordered by a hash of their file name (not the folder) and the first `val_fraction` of them are
held out. The split does not depend on the seed, on where the files lie, or on the order sources are listed in.
A corpus of a single file is cut into 100 blocks at line boundaries first, and the blocks are split the same way
(so a single file needs at least two lines: one long line, a minified dump, is refused with that reason).

`read_documents` holds every text in memory (evaluation, compression and the like read a few files);
`scan_documents` is for corpora of any size: its documents are file names (and, for the blocks of one large file,
byte ranges) whose text is read only when asked for, so pre-training tokenizes a corpus larger than memory.
"""

from __future__ import annotations

import glob
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.assets import CORPORA, corpus_files
from lmforge.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
SINGLE_FILE_BLOCKS = 100
IN_MEMORY_BYTES = 64 << 20  # a single-file corpus up to this size is cut into blocks in memory


@dataclass
class Document:
    """A document: its name and its text, or (lazily) where to read the text from (`path`, and `span`, a byte
    range of it), when `text` is None."""

    name: str
    text: str | None = None
    path: str | None = None
    span: tuple[int, int] | None = None
    size: int = 0  # bytes, known without reading (lazy) or of the text

    def __post_init__(self) -> None:
        if self.text is not None and not self.size:
            self.size = len(self.text.encode("utf-8"))

    def read(self) -> str:
        """The text (read from disk for a lazy document; raises DataError for bytes that are not UTF-8)."""
        if self.text is not None:
            return self.text
        with open(self.path, "rb") as f:
            if self.span:
                f.seek(self.span[0])
                data = f.read(self.span[1] - self.span[0])
            else:
                data = f.read()
        return _decode(data, Path(self.path), (self.span or (0, 0))[0])


def resolve_sources(sources: list[str]) -> list[Path]:
    """Expand corpus names, folders (recursively: .txt/.md/.rst files) and globs into a sorted list of files."""
    files: list[Path] = []
    for src in sources:
        if src in CORPORA:
            files += corpus_files(src)
            continue
        p = Path(src).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES and not f.name.startswith(".")
            )
            if not found:
                raise DataError(f"folder {p} has no text files (.txt, .md, .rst)")
            files += found
        elif any(ch in src for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"glob {src!r} matches no files")
            files += found
        else:
            raise DataError(
                f"corpus {src!r} not found: not a file, folder, glob or packaged corpus "
                f"(packaged: {', '.join(CORPORA)})"
            )
    # one file listed twice is read once
    return list(dict.fromkeys(f.resolve() for f in files))


def _decode(data: bytes, f: Path, offset: int = 0) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{f} is not UTF-8 text (bad byte at offset {offset + e.start}); convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {f.name} > {f.stem}.utf8.txt"
        ) from None
    return text.replace("\r\n", "\n").lstrip("\ufeff")


def read_documents(sources: list[str]) -> list[Document]:
    docs = []
    for f in resolve_sources(sources):
        text = _decode(f.read_bytes(), f)
        if text.strip():
            docs.append(Document(str(f), text))
    if not docs:
        raise DataError(f"corpus {', '.join(sources)} is empty: no file holds any text")
    return docs


def scan_documents(sources: list[str]) -> list[Document]:
    """The corpus as lazy documents (nothing read but file sizes; empty files left out). A corpus of one file
    is read now when it is small (so its blocks split exactly as read_documents' would); a larger one is cut into
    blocks at line ends by scanning it, and each block is read when tokenized."""
    files = [(f, f.stat().st_size) for f in resolve_sources(sources)]
    files = [(f, n) for f, n in files if n > 0]
    if not files:
        raise DataError(f"corpus {', '.join(sources)} is empty: no file holds any text")
    if len(files) == 1 and files[0][1] <= IN_MEMORY_BYTES:
        return read_documents([str(files[0][0])])
    if len(files) == 1:
        return _line_blocks(files[0][0], files[0][1], SINGLE_FILE_BLOCKS)
    return [Document(str(f), path=str(f), size=n) for f, n in files]


def _line_blocks(f: Path, size: int, n: int) -> list[Document]:
    """A large file as `n` lazy blocks of whole lines (by bytes: each block ends at the first line end past its
    share), found by reading the file once in pieces."""
    cuts, target, pos = [0], size / n, 0
    with open(f, "rb") as fh:
        while True:
            piece = fh.read(8 << 20)
            if not piece:
                break
            start = 0
            while len(cuts) < n and cuts[-1] + target < pos + len(piece):
                at = piece.find(b"\n", max(start, int(cuts[-1] + target) - pos))
                if at < 0:
                    break
                cuts.append(pos + at + 1)
                start = at + 1
            pos += len(piece)
    cuts = sorted(set(c for c in cuts if c < size)) + [size]
    return [
        Document(f"{f}#{i:03d}", path=str(f), span=(a, b), size=b - a) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
    ]


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) by document; see the module docstring."""
    if len(docs) == 1 and docs[0].text is None:  # a large file with no line break to cut it at
        raise DataError(
            f"corpus {docs[0].path} is one line of {docs[0].size:,} bytes; the validation part is cut "
            f"from a single file at line breaks, so break the text into lines or add more files"
        )
    if len(docs) == 1:
        one = docs[0]
        docs = _blocks(one, SINGLE_FILE_BLOCKS)
        if len(docs) < 2:  # a single file is cut only at line ends: one line (of any length) cannot be split
            lines = len([ln for ln in one.text.splitlines() if ln.strip()])
            raise DataError(
                f"corpus {one.name} is one file with {lines} line{'s' if lines != 1 else ''} of text "
                f"({len(one.text):,} characters); the validation part is cut from a single file at line breaks, "
                f"so break the text into lines (e.g. fold -s -w 200 {Path(one.name).name} > lines.txt) or add "
                "more files"
            )

    def key(d: Document) -> tuple[str, str]:
        # the file name alone decides, so the split is the same wherever the corpus is installed
        return hashlib.sha1(Path(d.name).name.encode()).hexdigest(), d.name

    ordered = sorted(docs, key=key)
    n_val = min(len(docs) - 1, max(1, math.ceil(val_fraction * len(docs))))
    val, train = ordered[:n_val], ordered[n_val:]
    by_name = {d.name: i for i, d in enumerate(docs)}  # keep the corpus order inside each part
    return sorted(train, key=lambda d: by_name[d.name]), sorted(val, key=lambda d: by_name[d.name])


def _blocks(doc: Document, n: int) -> list[Document]:
    lines = doc.text.splitlines(keepends=True)
    per = max(1, math.ceil(len(lines) / n))
    out = []
    for i in range(0, len(lines), per):
        text = "".join(lines[i : i + per])
        if text.strip():
            out.append(Document(f"{doc.name}#{i // per:03d}", text))
    return out
