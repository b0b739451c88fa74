"""Bible text from SWORD zText modules read straight off disk (no libsword): verses, and EN–ES verse pairs.

Debian ships the King James Version (`sword-text-kjv`) and the Reina-Valera 1909 (`sword-text-sparv`) as
SWORD modules under /usr/share/sword. Both use the KJV versification, so the i-th index slot of one module is the
same verse as the i-th slot of the other: a parallel corpus of ~31k sentence-sized pairs with no aligner needed.

File format, per testament (`ot`, `nt`):

- `.bzs`: 12-byte little-endian records (offset, compressed size, uncompressed size) of zlib blocks in `.bzz`;
- `.bzv`: 10-byte records (block u32, offset u32, size u16), one per index slot; size 0 means an empty slot.

Slot layout: slot 0 is empty, slot 1 the module heading, then per book a book slot (holding `<div ... osisID="Gen"
type="book" sID=...>`) and per chapter a heading slot (holding `<chapter ... sID="Gen.1"/>`) followed by that
chapter's verse slots. The last verse of a chapter carries the *end* tags (`<chapter eID="Gen.1"/>`, `<div eID=...
type="book"/>`), so only start tags (`sID`) mark headings; the structure is read from the markup, not from a table.

Cleaning keeps what a reader sees: footnotes (`<note>`) are dropped, every other tag is stripped keeping its
text, the pilcrow `¶` goes, entities are unescaped and whitespace squeezed. Titles inside verse slots are *kept*,
because both modules carry the same words there: the KJV wraps the Psalm superscriptions (`<title type="psalm">`,
e.g. Ps 3:1 "A Psalm of David, when he fled from Absalom his son."), the Psalm 119 acrostic letters and the
colophons of the Epistles (Rom 16:27 "Written to the Romans from Corinthus...") in `<title>` inside the verse,
while the RV 1909 has the same text as plain words of that verse ("Salmo de David, cuando huía...").

Known misalignments, left as they are (pairing is by slot; found by comparing the Strong's numbers both modules
tag their words with): where the RV 1909 numbers verses differently the module keeps the RV numbers inside KJV
slots, so the Spanish side is one verse off in Num 13 and 30, 1 Sam 24, Hos 12 and Jonah 2 (each after an empty
Spanish slot ending the chapter before), 1 Kgs 22:44-53, 1 Chr 21:16-30 and 2 Chr 33:11-25, and out of step in
Job 38:39-40:24. About 180 pairs, 0.6%; the default held-out books avoid all of them.

Besides, 76 KJV verses carry a stray USFM marker ("the \\nd LORD"), removed here, and the RV 1909 markup loses
the space between two words about 500 times (see _unglue).
"""

from __future__ import annotations

import csv
import html
import io
import os
import random
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lmforge.config import check_number
from lmforge.errors import DataError
from lmforge.files import check_out_dir, write_text

SWORD_ROOT = Path("/usr/share/sword")
KJV = "engKJV2006eb"
RV1909 = "spaRV1909eb"
PACKAGES = {KJV: "sword-text-kjv", RV1909: "sword-text-sparv"}  # module -> Debian package that installs it
ZTEXT_DIR = "modules/texts/ztext"
TESTAMENTS = ("ot", "nt")

# The 66 OSIS book ids in canonical order, as the KJV-versification modules name them.
BOOKS = (
    "Gen",
    "Exod",
    "Lev",
    "Num",
    "Deut",
    "Josh",
    "Judg",
    "Ruth",
    "1Sam",
    "2Sam",
    "1Kgs",
    "2Kgs",
    "1Chr",
    "2Chr",
    "Ezra",
    "Neh",
    "Esth",
    "Job",
    "Ps",
    "Prov",
    "Eccl",
    "Song",
    "Isa",
    "Jer",
    "Lam",
    "Ezek",
    "Dan",
    "Hos",
    "Joel",
    "Amos",
    "Obad",
    "Jonah",
    "Mic",
    "Nah",
    "Hab",
    "Zeph",
    "Hag",
    "Zech",
    "Mal",
    "Matt",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Rom",
    "1Cor",
    "2Cor",
    "Gal",
    "Eph",
    "Phil",
    "Col",
    "1Thess",
    "2Thess",
    "1Tim",
    "2Tim",
    "Titus",
    "Phlm",
    "Heb",
    "Jas",
    "1Pet",
    "2Pet",
    "1John",
    "2John",
    "3John",
    "Jude",
    "Rev",
)

# Held-out books, whole: a test set of 1,553 verses (5.0% of the 31,102) and a validation set of 929 (3.0%),
# each mixing narrative, wisdom, poetry, prophecy, gospel and epistles, and none touching a misaligned chapter.
# Verse counts (KJV): Ruth 85, Eccl 222, Lam 154, Amos 146, Mark 678, 1Thess 89, Titus 46, Jas 108, Jude 25.
DEFAULT_TEST_BOOKS = ("Ruth", "Eccl", "Lam", "Amos", "Mark", "1Thess", "Titus", "Jas", "Jude")
# Esth 167, Song 117, Joel 73, Mic 105, Gal 149, Phil 104, Col 95, 1Pet 105, 3John 14.
DEFAULT_VAL_BOOKS = ("Esth", "Song", "Joel", "Mic", "Gal", "Phil", "Col", "1Pet", "3John")


@dataclass
class Verse:
    book: str  # OSIS id, e.g. "Gen"
    chapter: int
    verse: int
    text: str


@dataclass
class VersePair:
    book: str
    chapter: int
    verse: int
    source: str
    target: str


class _HasBook(Protocol):
    book: str


# --------------------------------------------------------------------------------------------------------------
# reading a module


def sword_root(root: Path | str | None = None) -> Path:
    """The SWORD library folder: `root` if given, else $LMFORGE_SWORD_ROOT, else /usr/share/sword."""
    if root is not None:
        return Path(root)
    env = os.environ.get("LMFORGE_SWORD_ROOT")
    return Path(env) if env else SWORD_ROOT


def module_dir(name: str, root: Path | str | None = None) -> Path:
    """The folder of an installed zText module; a missing one is a DataError that says how to install it."""
    base = sword_root(root)
    folder = base / ZTEXT_DIR / name
    if not all((folder / f"{t}.{ext}").is_file() for t in TESTAMENTS for ext in ("bzs", "bzv", "bzz")):
        if name in PACKAGES:
            raise DataError(f"SWORD module {name} is not installed: apt-get install {PACKAGES[name]}")
        raise DataError(
            f"SWORD module {name} not found: no folder {folder} with ot/nt .bzs/.bzv/.bzz files "
            f"(known modules: {', '.join(PACKAGES)})"
        )
    return folder


def _read_slots(folder: Path, testament: str) -> list[str]:
    """The raw OSIS markup of every index slot of one testament ('' for empty slots).

    Blocks are decompressed on first use and cached for this call only, so reading a module costs one pass over
    its ~2 MB of zlib data and nothing stays in memory afterwards."""
    bzs = (folder / f"{testament}.bzs").read_bytes()
    bzz = (folder / f"{testament}.bzz").read_bytes()
    bzv = (folder / f"{testament}.bzv").read_bytes()
    blocks: dict[int, bytes] = {}

    def block(i: int) -> bytes:
        if i not in blocks:
            if (i + 1) * 12 > len(bzs):
                raise DataError(f"{folder / testament}.bzv points at block {i}, but .bzs has {len(bzs) // 12}")
            off, csize, _ = struct.unpack_from("<III", bzs, i * 12)
            try:
                blocks[i] = zlib.decompress(bzz[off : off + csize])
            except zlib.error as e:
                raise DataError(f"{folder / testament}.bzz: block {i} is corrupt ({e}); reinstall the module") from None
        return blocks[i]

    slots = []
    for blk, off, size in struct.iter_unpack("<IIH", bzv[: len(bzv) - len(bzv) % 10]):
        slots.append(block(blk)[off : off + size].decode("utf-8", errors="replace") if size else "")
    return slots


_BOOK_START = re.compile(r'<div\b[^>]*\btype="book"[^>]*>')
_START_ID = re.compile(r'\ssID="')  # `\s` so that osisID="..." does not count
_OSIS_ID = re.compile(r'\bosisID="([^"]+)"')
_CHAPTER_START = re.compile(r'<chapter\b[^>]*\ssID="[^>]*>')


def _label_slots(slots: list[str]) -> list[tuple[str, int, int] | None]:
    """(book, chapter, verse) for each verse slot, None for the module, book and chapter heading slots.

    Verses are numbered by counting slots after their chapter heading, empty slots included, so a module with a
    missing verse still numbers the verses after it right."""
    out: list[tuple[str, int, int] | None] = []
    book, chapter, verse = "", 0, 0
    for markup in slots:
        m = _BOOK_START.search(markup)
        if m and _START_ID.search(m.group(0)):
            ident = _OSIS_ID.search(m.group(0))
            book, chapter, verse = (ident.group(1) if ident else ""), 0, 0
            out.append(None)
        elif _CHAPTER_START.search(markup):
            chapter, verse = chapter + 1, 0
            out.append(None)
        elif book and chapter:
            verse += 1
            out.append((book, chapter, verse))
        else:
            out.append(None)  # slot 0, the module heading
    return out


_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
# An end tag directly followed by a start tag between two letters: in the RV 1909 markup this is a lost space
# ("enviada</transChange><w>por</w>", 500 places) except where an enclitic pronoun is written as its own <w>
# ("enviándo" + "le", 100 places). A verb form takes the pronoun unspaced: one ending in -ndo, -r or -d, one with a
# written accent (díjo+le, sáca+lo; on the last letter only in lower case, so "Jehová los" stays apart) and the
# short imperatives. Checked by hand on every such place in the RV 1909: five or so are still wrong either way.
_GLUED = re.compile(r"</\w+>(?:</\w+>)*(?:<\w+[^>]*>)+(?=\w)")  # starts with "</" so re scans for it fast
_WORD_BEFORE = re.compile(r"\w+$")
_WORD = re.compile(r"\w+")
_ENCLITICS = {"me", "te", "se", "le", "les", "lo", "los", "la", "las", "nos", "os"}
_VERB_FORM = re.compile(r"(?:ndo|[rd]|[áéíóú]\w+)$|^[a-zñ]\w*[áéíóú]$")
_SHORT_IMPERATIVES = {"di", "da", "haz", "pon", "ten", "sal", "ven"}
_NOT_VERBS = {
    "sólo",
    "éste",
    "ésta",
    "éstos",
    "éstas",
    "ése",
    "ésa",
    "aquél",
    "también",
    "cuánto",
    "cuánta",
    "cuántos",
    "cuántas",
    "ejército",
    "por",
    "mar",
    "señor",
    "ciudad",
    "verdad",
}
_SELF_CLOSING = re.compile(r"<[^>]*/>")
_TAG = re.compile(r"<[^>]*>")
_USFM = re.compile(r"\\\+?[a-z]+\d*\*?")  # "the \nd LORD": a USFM marker left in 76 KJV verses


def _unglue(m: re.Match) -> str:
    text, tags = m.string, m.group(0)
    before = _WORD_BEFORE.search(text, max(0, m.start() - 40), m.start())
    if before is None:
        return tags
    stem, word, nxt = before.group(0), before.group(0).lower(), _WORD.match(text, m.end()).group(0).lower()
    joined = (
        nxt in _ENCLITICS
        and word not in _NOT_VERBS
        and (_VERB_FORM.search(stem) is not None or word in _SHORT_IMPERATIVES)
    )
    return tags if joined else tags + " "


def clean_osis(markup: str) -> str:
    """Plain verse text from OSIS markup: footnotes dropped, tags stripped (their text kept), no pilcrows."""
    text = _NOTE.sub("", markup) if "<note" in markup else markup
    text = _GLUED.sub(_unglue, text)
    text = _SELF_CLOSING.sub(" ", text)  # milestones, line and paragraph markers separate words
    text = _TAG.sub("", text)  # <w>, <transChange>, <q>... wrap words and punctuation follows them unspaced
    if "&" in text:
        text = html.unescape(text)
    if "\\" in text:
        text = _USFM.sub("", text)
    text = text.replace("¶", " ")
    return " ".join(text.split())


def _module(name: str, root: Path | str | None) -> dict[str, tuple[list[str], list[tuple[str, int, int] | None]]]:
    folder = module_dir(name, root)
    out = {}
    for t in TESTAMENTS:
        slots = _read_slots(folder, t)
        out[t] = (slots, _label_slots(slots))
    return out


def read_module(name: str, root: Path | str | None = None) -> list[Verse]:
    """Every non-empty verse of both testaments of a zText module, in canonical order."""
    verses = []
    for slots, labels in _module(name, root).values():
        for markup, ref in zip(slots, labels):
            if ref is not None and (text := clean_osis(markup)):
                verses.append(Verse(*ref, text))
    if not verses:
        raise DataError(f"SWORD module {name} under {sword_root(root)} holds no verses; reinstall it")
    return verses


def bible_pairs(source: str = KJV, target: str = RV1909, root: Path | str | None = None) -> list[VersePair]:
    """Verse-aligned pairs of two modules with the same versification, both sides non-empty, canonical order.

    Slot i of one module is slot i of the other, so pairs are made by slot; the book/chapter/verse come from the
    source module's markup. KJV + RV 1909: 31,084 pairs of the 31,102 verses; the 18 Spanish verses that are
    missing are empty slots or hold only end tags where the RV numbering merges or moves a verse (Num 12:16,
    Job 38:39-41, Job 40:20-24, Jonah 1:17, 2 Cor 13:14, ...)."""
    src, tgt = _module(source, root), _module(target, root)
    pairs = []
    for t in TESTAMENTS:
        (s_slots, s_labels), (t_slots, t_labels) = src[t], tgt[t]
        if len(s_slots) != len(t_slots):
            raise DataError(
                f"SWORD modules {source} and {target} differ in versification: {len(s_slots)} vs "
                f"{len(t_slots)} slots in the {t.upper()}; pair modules that share one"
            )
        for s_markup, t_markup, ref, t_ref in zip(s_slots, t_slots, s_labels, t_labels):
            if ref is None:
                continue
            s_text, t_text = clean_osis(s_markup), clean_osis(t_markup)
            if not (s_text and t_text):
                continue
            if t_ref is not None and t_ref != ref:
                raise DataError(
                    f"SWORD modules {source} and {target} disagree on verse order: "
                    f"{_ref(ref)} in one is {_ref(t_ref)} in the other"
                )
            pairs.append(VersePair(*ref, s_text, t_text))
    return pairs


def _ref(ref: tuple[str, int, int]) -> str:
    return f"{ref[0]} {ref[1]}:{ref[2]}"


# --------------------------------------------------------------------------------------------------------------
# held-out split


def split_by_book(
    pairs: Sequence[_HasBook],
    test_books: Sequence[str] = DEFAULT_TEST_BOOKS,
    val_books: Sequence[str] = DEFAULT_VAL_BOOKS,
) -> tuple[list, list, list]:
    """(train, val, test) with whole books held out, so no verse of a test or validation book is trained on.

    Split by book, not by verse: neighbouring verses repeat names and phrases ("And the LORD spake unto Moses"),
    so a random verse split would score a model on near-copies of what it trained on. The defaults hold out 5% of
    the verses for test and 3% for validation (see DEFAULT_TEST_BOOKS)."""
    for books in (test_books, val_books):
        unknown = [b for b in books if b not in BOOKS]
        if unknown:
            raise DataError(f"unknown book id(s) {', '.join(unknown)}; valid OSIS ids: {', '.join(BOOKS)}")
    both = set(test_books) & set(val_books)
    if both:
        raise DataError(f"book(s) {', '.join(sorted(both))} are in both the test and validation sets; pick one")
    test_set, val_set = set(test_books), set(val_books)
    train, val, test = [], [], []
    for p in pairs:
        (test if p.book in test_set else val if p.book in val_set else train).append(p)
    return train, val, test


# --------------------------------------------------------------------------------------------------------------
# long documents by genre (a classification set whose texts run past one encoder window)

# Five genres of the 66 books; the test books (about a quarter of each genre's words) are held out whole, so no
# passage of a test book is trained on and a model must recognise the genre, not the book.
GENRES = {
    "law & history": BOOKS[:17],  # Genesis - Esther
    "wisdom & poetry": BOOKS[17:22],  # Job - Song of Solomon
    "prophets": BOOKS[22:39],  # Isaiah - Malachi
    "gospels & acts": BOOKS[39:44],
    "epistles & revelation": BOOKS[44:],
}
GENRE_TEST_BOOKS = (
    "Exod",
    "Judg",
    "2Kgs",
    "Neh",
    "Prov",
    "Eccl",
    "Song",
    "Lam",
    "Dan",
    "Hos",
    "Amos",
    "Mic",
    "Zech",
    "Mal",
    "Mark",
    "John",
    "1Cor",
    "Gal",
    "1Thess",
    "Jas",
    "1John",
    "Jude",
)


def genre_documents(
    min_words: int = 300,
    max_words: int = 1000,
    per_genre: int | None = 200,
    seed: int = 0,
    root: Path | str | None = None,
) -> dict[str, list[tuple[str, str, str]]]:
    """{"train": [...], "test": [...]} of (text, genre, book): each book of the KJV cut into passages of whole
    consecutive verses, each `min_words` to `max_words` long (a length drawn uniformly per passage; a book's
    remainder shorter than min_words is dropped), split by book (GENRE_TEST_BOOKS are the test books). At most
    `per_genre` passages of each genre per split (drawn under the seed), so no genre swamps the others."""
    check_number("per_genre", per_genre, 1, integer=True)
    check_number("min_words", min_words, 1, integer=True)
    check_number("max_words", max_words, min_words, integer=True)
    rng = random.Random(seed)
    genre = {b: g for g, books in GENRES.items() for b in books}
    by_book: dict[str, list[str]] = {}
    for v in read_module(KJV, root):
        by_book.setdefault(v.book, []).append(v.text)
    out: dict[str, dict[str, list[tuple[str, str, str]]]] = {"train": {}, "test": {}}
    for book, verses in by_book.items():
        split = "test" if book in GENRE_TEST_BOOKS else "train"
        want, words, part = rng.randint(min_words, max_words), 0, []
        for text in verses:
            part.append(text)
            words += len(text.split())
            if words >= want:
                out[split].setdefault(genre[book], []).append((" ".join(part), genre[book], book))
                want, words, part = rng.randint(min_words, max_words), 0, []
    docs = {}
    for split, groups in out.items():
        rows = []
        for g in GENRES:
            items = groups.get(g, [])
            rows += items if per_genre is None or len(items) <= per_genre else rng.sample(items, per_genre)
        rng.shuffle(rows)
        docs[split] = rows
    return docs


def write_genre_documents(out: str | Path, per_genre: int | None = 200, seed: int = 0) -> dict[str, int]:
    """`lmforge data bible-genres`: genre_documents written as out/train.csv and out/test.csv (text, label,
    book); returns the passages per split. Settings and `out` are checked before anything is read."""
    check_number("--per-genre", per_genre, 1, integer=True)
    out = check_out_dir(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in genre_documents(per_genre=per_genre, seed=seed).items():
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["text", "label", "book"])
        w.writerows(rows)
        write_text(out / f"{split}.csv", buf.getvalue())
        counts[split] = len(rows)
    return counts
