"""Seq2seq pairs: files (JSONL/CSV/TSV) and the EN-ES Bible read from the Debian SWORD modules."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from lmforge.data import pairs as pairs_mod
from lmforge.data import sword
from lmforge.data.pairs import PairSet, read_pairs, truncation_report
from lmforge.errors import DataError

INSTALLED = all((sword.SWORD_ROOT / sword.ZTEXT_DIR / m / "nt.bzv").is_file() for m in (sword.KJV, sword.RV1909))
needs_bible = pytest.mark.skipif(
    not INSTALLED, reason="SWORD modules missing: apt-get install sword-text-kjv sword-text-sparv"
)


# --------------------------------------------------------------------------------------------------------------
# the real Bible


@pytest.fixture(scope="module")
def bible() -> list[sword.VersePair]:
    return sword.bible_pairs()


def _verse(pairs, book, chapter, verse):
    return next(p for p in pairs if (p.book, p.chapter, p.verse) == (book, chapter, verse))


@needs_bible
def test_bible_pairs_are_aligned_and_clean(bible):
    assert len(bible) > 31_000  # 31,084 of the 31,102 KJV-versification verses
    gen = _verse(bible, "Gen", 1, 1)
    assert gen.source == "In the beginning God created the heaven and the earth."
    assert gen.target.startswith("EN el principio crió Dios")
    john = _verse(bible, "John", 3, 16)
    assert john.source.startswith("For God so loved the world") and john.target.startswith("Porque de tal manera")
    assert not [p for p in bible if any(c in p.source + p.target for c in "<>¶\\")]
    assert all(p.source and p.target for p in bible)
    assert tuple(dict.fromkeys(p.book for p in bible)) == sword.BOOKS
    # Psalm superscriptions and Epistle colophons are kept on both sides
    ps = _verse(bible, "Ps", 51, 1)
    assert ps.source.startswith("To the chief Musician") and ps.target.startswith("Al Músico principal")
    rom = _verse(bible, "Rom", 16, 27)
    assert "Corinthus" in rom.source and "Corinto" in rom.target
    assert "enviada por medio de Febe" in rom.target  # a space the markup lost, restored
    assert "plantóla" in _verse(bible, "Gen", 31, 25).target  # an enclitic pronoun, kept joined


@needs_bible
def test_split_by_book_holds_out_whole_books(bible):
    train, val, test = sword.split_by_book(bible)
    books = [{p.book for p in part} for part in (train, val, test)]
    assert not (books[0] & books[1]) and not (books[0] & books[2]) and not (books[1] & books[2])
    assert books[2] == set(sword.DEFAULT_TEST_BOOKS) and books[1] == set(sword.DEFAULT_VAL_BOOKS)
    assert len(train) + len(val) + len(test) == len(bible)
    assert 0.045 < len(test) / len(bible) < 0.055 and 0.025 < len(val) / len(bible) < 0.035
    assert (len(val), len(test)) == (929, 1553)  # the counts the defaults document
    with pytest.raises(DataError, match="valid OSIS ids: Gen, Exod"):
        sword.split_by_book(bible, test_books=["Genesis"])
    with pytest.raises(DataError, match="both the test and validation"):
        sword.split_by_book(bible, test_books=["Ruth"], val_books=["Ruth"])


@needs_bible
def test_read_pairs_bible_name(bible, monkeypatch):
    ps = read_pairs("bible-en-es")
    assert len(ps) == len(bible) and ps.sources[0] == bible[0].source and ps.targets[0] == bible[0].target
    assert ps.groups is not None and ps.groups[0] == "Gen" and (ps.source_col, ps.target_col) == ("en", "es")
    calls = []
    monkeypatch.setattr(sword, "bible_pairs", lambda s, t: calls.append((s, t)) or bible[:3])
    assert read_pairs("bible-es-en").source_col == "es" and calls == [(sword.RV1909, sword.KJV)]
    with pytest.raises(DataError, match="fixed columns"):
        read_pairs("bible-en-es", source_col="text")


def test_missing_module_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="apt-get install sword-text-kjv"):
        sword.read_module(sword.KJV, root=tmp_path)
    _write_module(tmp_path, sword.KJV, {"ot": _testament("Gen", [["One."]]), "nt": _testament("Matt", [["M."]])})
    with pytest.raises(DataError, match="apt-get install sword-text-sparv"):
        sword.bible_pairs(root=tmp_path)
    with pytest.raises(DataError, match="modules/texts/ztext/engXYZ"):
        sword.read_module("engXYZ", root=tmp_path)
    monkeypatch.setenv("LMFORGE_SWORD_ROOT", str(tmp_path))
    assert sword.read_module(sword.KJV)[0].text == "One."  # the module written above, found through the variable
    with pytest.raises(DataError, match="SWORD module spaRV1909eb is not installed"):
        sword.read_module(sword.RV1909)


# --------------------------------------------------------------------------------------------------------------
# the zText format, on a tiny module written here


def _write_module(root: Path, name: str, testaments: dict[str, list[str]]) -> None:
    """A zText module: all slots of a testament in one zlib block."""
    d = root / sword.ZTEXT_DIR / name
    d.mkdir(parents=True)
    for t in sword.TESTAMENTS:
        data, index = b"", b""
        for text in testaments[t]:
            raw = text.encode("utf-8")
            index += struct.pack("<IIH", 0, len(data), len(raw))
            data += raw
        block = zlib.compress(data)
        (d / f"{t}.bzz").write_bytes(block)
        (d / f"{t}.bzs").write_bytes(struct.pack("<III", 0, len(block), len(data)))
        (d / f"{t}.bzv").write_bytes(index)


def _testament(book: str, chapters: list[list[str]]) -> list[str]:
    slots = ["", '<milestone type="x-importer"/>', f'<div osisID="{book}" sID="b1" type="book"/><title>Book</title>']
    for c, verses in enumerate(chapters, 1):
        slots.append(f'<chapter n="{c}" osisID="{book}.{c}" sID="{book}.{c}"/>')
        slots += verses
    slots[-1] += f'<chapter eID="{book}.{len(chapters)}"/><div eID="b1" osisID="{book}" type="book"/>'
    return slots


def test_ztext_structure_and_cleaning(tmp_path):
    en = {
        "ot": _testament(
            "Gen",
            [
                [
                    '¶ In the <w lemma="strong:H7225">beginning</w>.<note placement="foot"><reference>1.1</reference>'
                    "Heb. <w>x</w></note>",
                    "",
                    'Tom &amp; Jerry, the \\nd LORD <transChange type="added">is</transChange> here.<chapter eID="Gen.1"/>',  # noqa: E501
                ],
                ['<title type="psalm">A Psalm.</title> Sing.'],
            ],
        ),
        "nt": _testament("Matt", [["The book."]]),
    }
    es = {
        "ot": _testament("Gen", [["EN el principio.", "Dos.", ""], ["Salmo. Cantad."]]),
        "nt": _testament("Matt", [["<w>El</w><w>libro</w>."]]),
    }
    _write_module(tmp_path, "en", en)
    _write_module(tmp_path, "es", es)
    verses = sword.read_module("en", root=tmp_path)
    assert [(v.book, v.chapter, v.verse, v.text) for v in verses] == [
        ("Gen", 1, 1, "In the beginning."),
        ("Gen", 1, 3, "Tom & Jerry, the LORD is here."),
        ("Gen", 2, 1, "A Psalm. Sing."),
        ("Matt", 1, 1, "The book."),
    ]
    got = [(p.book, p.chapter, p.verse, p.source, p.target) for p in sword.bible_pairs("en", "es", root=tmp_path)]
    assert got == [
        ("Gen", 1, 1, "In the beginning.", "EN el principio."),
        ("Gen", 2, 1, "A Psalm. Sing.", "Salmo. Cantad."),
        ("Matt", 1, 1, "The book.", "El libro."),
    ]


def test_ztext_versification_mismatch(tmp_path):
    _write_module(tmp_path, "a", {"ot": _testament("Gen", [["One.", "Two."]]), "nt": _testament("Matt", [["M."]])})
    _write_module(tmp_path, "b", {"ot": _testament("Gen", [["Uno."]]), "nt": _testament("Matt", [["M."]])})
    with pytest.raises(DataError, match="differ in versification: 6 vs 5 slots in the OT"):
        sword.bible_pairs("a", "b", root=tmp_path)


# --------------------------------------------------------------------------------------------------------------
# files


def test_read_pairs_jsonl_csv_tsv(tmp_path):
    rows = [{"source": "hello", "target": "hola"}, {"source": "cat, dog", "target": "gato, perro"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text('source,target\nhello,hola\n"cat, dog","gato, perro"\n', encoding="utf-8")
    (tmp_path / "p.tsv").write_text("source\ttarget\nhello\thola\ncat, dog\tgato, perro\n", encoding="utf-8")
    for name in ("p.jsonl", "p.csv", "p.tsv"):
        ps = read_pairs(tmp_path / name)
        assert ps.sources == ["hello", "cat, dog"] and ps.targets == ["hola", "gato, perro"], name
        assert (ps.source_col, ps.target_col, ps.dropped_empty, ps.groups) == ("source", "target", 0, None)
    sub = ps.subset([1])
    assert isinstance(sub, PairSet) and len(sub) == 1 and sub.targets == ["gato, perro"]


def test_read_pairs_picks_and_names_columns(tmp_path):
    f = tmp_path / "sum.jsonl"
    f.write_text(json.dumps({"id": 1, "article": "A long text.", "highlights": "Short."}) + "\n", encoding="utf-8")
    ps = read_pairs(f)
    assert (ps.source_col, ps.target_col, ps.sources, ps.targets) == (
        "article",
        "highlights",
        ["A long text."],
        ["Short."],
    )
    ps = read_pairs(f, source_col="highlights", target_col="article")
    assert ps.sources == ["Short."]
    with pytest.raises(DataError) as e:
        read_pairs(f, source_col="body")
    assert str(e.value) == (f"{f} has no column 'body' (columns: id, article, highlights); pass --source-col NAME")
    with pytest.raises(DataError, match="pass --target-col NAME"):
        read_pairs(f, target_col="abstract")
    g = tmp_path / "odd.csv"
    g.write_text("a,b\nx,y\n", encoding="utf-8")
    with pytest.raises(DataError, match="no source column found among a, b; name it with --source-col"):
        read_pairs(g)


def test_read_pairs_drops_empty_sides(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text("en\tes\nyes\tsí\n\tnada\nnothing\t \nno\tno\n", encoding="utf-8")
    ps = read_pairs(f)
    assert (ps.sources, ps.targets, ps.dropped_empty) == (["yes", "no"], ["sí", "no"], 2)
    assert ps.subset([1]).dropped_empty == 2  # a file-level count, kept for the run's report
    g = tmp_path / "empty.csv"
    g.write_text("src,tgt\n,a\nb,\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_pairs(g)
    assert str(e.value) == f"{g} has no pairs with both sides non-empty (2 rows, all with an empty 'src' or 'tgt')"


def test_truncation_report():
    assert truncation_report([10, 20, 30], 128, "targets") is None
    assert truncation_report([], 128, "targets") is None
    lengths = [200] * 12 + [50] * 2988
    assert truncation_report(lengths, 128, "targets") == (
        "12 of 3,000 targets are longer than 128 tokens and were truncated (raise --max-target-len to keep them)"
    )
    assert truncation_report([600, 3], 512, "sources") == (
        "1 of 2 sources is longer than 512 tokens and was truncated (raise --max-source-len to keep them)"
    )


def test_bible_names_are_data_names():
    assert set(pairs_mod.BIBLE_DATA) == {"bible-en-es", "bible-es-en"}
