"""Tokenizers: a thin layer over the `tokenizers` library (Rust, fast, and the format every HF model ships).

lmforge trains byte-level BPE (GPT-2 style: any UTF-8 text round-trips, no unknown tokens) and loads any
`tokenizer.json`. The wrapper adds what the rest of lmforge needs: special-token ids, batch encoding with left
or right padding, and saving next to a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import ConfigError, ModelLoadError
from lmforge.files import save_with, write_json

EOS = "<|endoftext|>"
DEFAULT_SPECIALS = (EOS, "<|pad|>")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_token: str | None = None, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 specials: dict[str, str | None] | None = None) -> None:
        # padding and truncation are the caller's business here (a tokenizer.json may carry fixed-length
        # padding, as sentence-transformers' files do); `encode_for_encoder` truncates to the model's length
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        vocab = tok.get_vocab()
        if eos_token is None and EOS in vocab:
            eos_token = EOS
        if pad_token is None:
            pad_token = next((t for t in ("<|pad|>", "[PAD]", "<pad>") if t in vocab), None)
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template
        # BERT-style specials: [CLS] text [SEP] (pair [SEP]), [MASK] for masked LM
        specials = specials or {}
        self.cls_token = specials.get("cls_token") or ("[CLS]" if "[CLS]" in vocab else None)
        self.sep_token = specials.get("sep_token") or ("[SEP]" if "[SEP]" in vocab else None)
        self.mask_token = specials.get("mask_token") or ("[MASK]" if "[MASK]" in vocab else None)
        self.unk_token = specials.get("unk_token") or ("[UNK]" if "[UNK]" in vocab else None)

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192,
                  special_tokens: Sequence[str] = DEFAULT_SPECIALS, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on an iterator of texts (documents or lines)."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=special_tokens[0] if special_tokens else None)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json, or the tokenizer of a model directory (with its tokenizer_config.json)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelLoadError(f"no tokenizer.json at {path}")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise ModelLoadError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        extra = {}
        cfg = file.parent / "tokenizer_config.json"
        if cfg.is_file():
            try:
                extra = json.loads(cfg.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ModelLoadError(f"{cfg} is not valid JSON ({e})") from None

        def name(key: str) -> str | None:
            v = extra.get(key)
            return v.get("content") if isinstance(v, dict) else v

        return cls(tok, eos_token=name("eos_token"), bos_token=name("bos_token"), pad_token=name("pad_token"),
                   chat_template=extra.get("chat_template"),
                   specials={k: name(k) for k in ("cls_token", "sep_token", "mask_token", "unk_token")})

    def save(self, path: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json (+ tokenizer_config.json) into a folder, or to a .json file path."""
        path = Path(path)
        if path.suffix == ".json":
            save_with(path, lambda p: self.tok.save(str(p)))
            return
        path.mkdir(parents=True, exist_ok=True)
        save_with(path / "tokenizer.json", lambda p: self.tok.save(str(p)))
        # model_max_length: transformers' pipelines truncate to it (an encoder's position table)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length or 1_000_000,
               "eos_token": self.eos_token, "bos_token": self.bos_token, "pad_token": self.pad_token,
               "cls_token": self.cls_token, "sep_token": self.sep_token, "mask_token": self.mask_token,
               "unk_token": self.unk_token, "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        write_json(path / "tokenizer_config.json", {k: v for k, v in cfg.items() if v is not None})

    # --- ids ---------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        pid = self.token_id(self.pad_token)
        return pid if pid is not None else (self.eos_id if self.eos_id is not None else 0)

    # --- text <-> ids ------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    # --- encoder inputs --------------------------------------------------------------------------------------

    def encode_for_encoder(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                           max_len: int = 512) -> list:
        """`tokenizers` Encodings of [CLS] text [SEP] (or [CLS] a [SEP] b [SEP]), truncated to max_len
        (longest side first), unpadded: ids, type_ids, offsets and word_ids are on each."""
        self.tok.enable_truncation(max_len, strategy="longest_first")
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            return self.tok.encode_batch(inputs, add_special_tokens=True)
        finally:
            self.tok.no_truncation()

    def continuation_ids(self) -> set[int]:
        """Ids of WordPiece tokens that continue a word (`##ing`): whole-word masking masks them with their word."""
        return {i for t, i in self.tok.get_vocab().items() if t.startswith("##")}

    @classmethod
    def train_wordpiece(cls, texts: Iterable[str], vocab_size: int = 8192, lowercase: bool = True,
                        min_frequency: int = 2) -> Tokenizer:
        """Train a BERT-style WordPiece vocabulary (normalise, split on spaces and punctuation, `##` pieces)."""
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return cls(tok, pad_token="[PAD]")



def train_tokenizer(sources: Sequence[str], vocab_size: int = 8192, out: str | Path | None = None,
                    special_tokens: Sequence[str] = DEFAULT_SPECIALS, kind: str = "bpe",
                    lowercase: bool = True) -> Tokenizer:
    """Train a tokenizer on corpora (names, files, folders, globs) and optionally save it.

    kind "bpe": byte-level BPE for decoders; "wordpiece": BERT-style WordPiece ([CLS]/[SEP]/[MASK], `##`
    pieces, lower-cased unless lowercase=False) for encoders. `out` ending in .json is the tokenizer file
    itself; otherwise a folder that gets tokenizer.json and tokenizer_config.json."""
    from lmforge.data.corpus import read_documents

    if kind not in ("bpe", "wordpiece"):
        raise ConfigError(f"tokenizer kind {kind!r} is not one of bpe, wordpiece")
    floor = 256 + len(special_tokens) if kind == "bpe" else 100
    if vocab_size < floor:
        raise ConfigError(f"vocab_size must be at least {floor}" + (" (256 bytes + special tokens)" if kind == "bpe"
                                                                    else ""))
    docs = read_documents(list(sources))
    if kind == "bpe":
        tok = Tokenizer.train_bpe((d.text for d in docs), vocab_size=vocab_size, special_tokens=special_tokens)
    else:
        tok = Tokenizer.train_wordpiece((d.text for d in docs), vocab_size=vocab_size, lowercase=lowercase)
    if out is not None:
        tok.save(out)
    return tok
