"""Training a tokenizer on corpora (`lmforge tokenizer train`): documents read as lmforge.data.corpus reads them,
then one of the three trainers of lmforge.tokenizer.Tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmforge.data.corpus import read_documents
from lmforge.errors import ConfigError
from lmforge.files import check_out_dir, check_out_file
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer


def train_tokenizer(
    sources: Sequence[str],
    vocab_size: int = 8192,
    out: str | Path | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIALS,
    kind: str = "bpe",
    lowercase: bool | None = None,
    extra_ids: int = 100,
) -> Tokenizer:
    """Train a tokenizer on corpora (names, files, folders, globs) and optionally save it.

    kind "bpe": byte-level BPE for decoders; "wordpiece": BERT-style WordPiece ([CLS]/[SEP]/[MASK], `##`
    pieces, lower-cased unless lowercase=False) for encoders; "unigram": T5-style SentencePiece Unigram with
    `extra_ids` `<extra_id_N>` sentinels for span corruption (special_tokens do not apply). lowercase is
    WordPiece's only (byte-level BPE and Unigram keep case): given for another kind, it is refused.
    `out` ending in .json is the tokenizer file itself; otherwise a folder that gets tokenizer.json and
    tokenizer_config.json."""
    if kind not in ("bpe", "wordpiece", "unigram"):
        raise ConfigError(f"tokenizer kind {kind!r} is not one of bpe, wordpiece, unigram")
    if lowercase is not None and kind != "wordpiece":
        raise ConfigError(
            f"{'--cased' if lowercase is False else 'lowercase'} is WordPiece's setting; --kind {kind} "
            "keeps case always: drop it"
        )
    floor = {"bpe": 256 + len(special_tokens), "wordpiece": 100, "unigram": 100 + extra_ids}[kind]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < floor:
        why = {"bpe": " (256 bytes + special tokens)", "wordpiece": "", "unigram": f" (100 + {extra_ids} sentinels)"}[
            kind
        ]
        raise ConfigError(f"--vocab-size must be a whole number of at least {floor}{why}, got {vocab_size!r}")
    if out is not None:  # an unusable output path fails before the corpus is read
        (check_out_file if Path(out).suffix == ".json" else check_out_dir)(out, "--out")
    docs = read_documents(list(sources))
    if kind == "bpe":
        tok = Tokenizer.train_bpe((d.text for d in docs), vocab_size=vocab_size, special_tokens=special_tokens)
    elif kind == "wordpiece":
        tok = Tokenizer.train_wordpiece((d.text for d in docs), vocab_size=vocab_size, lowercase=lowercase is not False)
    else:
        tok = Tokenizer.train_unigram((d.text for d in docs), vocab_size=vocab_size, extra_ids=extra_ids)
    if out is not None:
        tok.save(out)
    return tok
