"""Tokenizers: a thin layer over the `tokenizers` library (Rust, fast, and the format every HF model ships).

lmforge trains byte-level BPE (GPT-2 style: any UTF-8 text round-trips, no unknown tokens), BERT-style
WordPiece, and T5-style Unigram (SentencePiece's algorithm, with `<extra_id_N>` sentinels for span corruption),
and loads any `tokenizer.json`. The wrapper adds what the rest of lmforge needs: special-token ids, batch
encoding with left or right padding, and saving next to a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import ConfigError, ModelLoadError
from lmforge.files import save_with, write_json

EOS = "<|endoftext|>"
DEFAULT_SPECIALS = (EOS, "<|pad|>")
# T5's specials: pad 0, eos 1, unk 2; sentinel i is "<extra_id_i>" at id vocab_size - 1 - i
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
SENTINEL = "<extra_id_{}>"


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        specials: dict[str, str | None] | None = None,
    ) -> None:
        # padding and truncation are the caller's business here (a tokenizer.json may carry fixed-length
        # padding, as sentence-transformers' files do); `encode_for_encoder` truncates to the model's length
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        vocab = tok.get_vocab()
        if eos_token is None:
            eos_token = next((t for t in (EOS, "</s>") if t in vocab), None)
        if pad_token is None:
            pad_token = next((t for t in ("<|pad|>", "[PAD]", "<pad>") if t in vocab), None)
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.chat_template = chat_template
        # BERT-style specials: [CLS] text [SEP] (pair [SEP]), [MASK] for masked LM
        specials = specials or {}
        self.cls_token = specials.get("cls_token") or ("[CLS]" if "[CLS]" in vocab else None)
        self.sep_token = specials.get("sep_token") or ("[SEP]" if "[SEP]" in vocab else None)
        self.mask_token = specials.get("mask_token") or ("[MASK]" if "[MASK]" in vocab else None)
        self.unk_token = specials.get("unk_token") or next((t for t in ("[UNK]", "<unk>") if t in vocab), None)

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int = 8192,
        special_tokens: Sequence[str] = DEFAULT_SPECIALS,
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Train a byte-level BPE on an iterator of texts (documents or lines)."""
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
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
            raise ModelLoadError(
                f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]}); download or save it again"
            ) from None
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

        return cls(
            tok,
            eos_token=name("eos_token"),
            bos_token=name("bos_token"),
            pad_token=name("pad_token"),
            chat_template=extra.get("chat_template"),
            specials={k: name(k) for k in ("cls_token", "sep_token", "mask_token", "unk_token")},
        )

    def save(self, path: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json (+ tokenizer_config.json) into a folder, or to a .json file path."""
        path = Path(path)
        if path.suffix == ".json":
            save_with(path, lambda p: self.tok.save(str(p)))
            return
        path.mkdir(parents=True, exist_ok=True)
        save_with(path / "tokenizer.json", lambda p: self.tok.save(str(p)))
        # model_max_length: transformers' pipelines truncate to it (an encoder's position table)
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length or 1_000_000,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "cls_token": self.cls_token,
            "sep_token": self.sep_token,
            "mask_token": self.mask_token,
            "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": False,
        }
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

    def sentinel_id(self, i: int) -> int | None:
        """Id of the span-corruption sentinel `<extra_id_i>`, or None if the vocabulary lacks it."""
        return self.tok.token_to_id(SENTINEL.format(i))

    @property
    def num_sentinels(self) -> int:
        """How many sentinels `<extra_id_0>`, `<extra_id_1>`, ... the vocabulary has (counted from 0 up)."""
        n = 0
        while self.sentinel_id(n) is not None:
            n += 1
        return n

    def sentinel_ids(self, n: int) -> list[int]:
        """Ids of `<extra_id_0>` ... `<extra_id_{n-1}>`, in that order."""
        ids = [self.sentinel_id(i) for i in range(n)]
        if None in ids:
            raise ConfigError(
                f"the tokenizer has {self.num_sentinels} <extra_id_N> sentinel tokens, {n} are "
                f"needed: train one with Tokenizer.train_unigram(extra_ids=...)"
            )
        return ids  # type: ignore[return-value]

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

    def encode_for_encoder(self, texts: Sequence[str], pairs: Sequence[str] | None = None, max_len: int = 512) -> list:
        """`tokenizers` Encodings of [CLS] text [SEP] (or [CLS] a [SEP] b [SEP]), truncated to max_len
        (longest side first), unpadded: ids, type_ids, offsets and word_ids are on each."""
        self.tok.enable_truncation(max_len, strategy="longest_first")
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            return self.tok.encode_batch(inputs, add_special_tokens=True)
        finally:
            self.tok.no_truncation()

    def encode_windows(self, texts: Sequence[str], max_len: int, stride: int) -> list[list[list[int]]]:
        """Each text whole, as the ids of [CLS] ... [SEP] windows of at most max_len tokens, neighbours sharing
        `stride` tokens (`tokenizers`' overflowing encodings): one window for a text that fits."""
        if not 0 <= stride < max_len - 2:
            raise ConfigError(f"the window overlap (stride {stride}) must be below max_len - 2 ({max_len - 2})")
        self.tok.enable_truncation(max_len, stride=stride, strategy="longest_first")
        try:
            return [
                [e.ids] + [o.ids for o in e.overflowing]
                for e in self.tok.encode_batch(list(texts), add_special_tokens=True)
            ]
        finally:
            self.tok.no_truncation()

    def continuation_ids(self) -> set[int]:
        """Ids of WordPiece tokens that continue a word (`##ing`): whole-word masking masks them with their word."""
        return {i for t, i in self.tok.get_vocab().items() if t.startswith("##")}

    @classmethod
    def train_wordpiece(
        cls, texts: Iterable[str], vocab_size: int = 8192, lowercase: bool = True, min_frequency: int = 2
    ) -> Tokenizer:
        """Train a BERT-style WordPiece vocabulary (normalise, split on spaces and punctuation, `##` pieces), the
        same one every time on the same texts.

        tokenizers' WordPieceTrainer numbers the `##` pieces in hash-map order, and those numbers break ties
        between equally frequent merges, so one corpus gave a different vocabulary in each process
        (tokenizers#1794). The same merges are learned here by its plain BPE trainer, whose alphabet is sorted
        and which has no `##` pieces of its own: every character of a word is written as a stand-in from a
        private-use plane (one plane for a word's first character, another for the characters after it), and
        the learned pieces are written back as `word` and `##piece` tokens of a WordPiece model."""
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        pre = pre_tokenizers.BertPreTokenizer()
        first: dict[str, str] = {}  # character -> its stand-in as a word's first character
        rest: dict[str, str] = {}  # character -> its stand-in after it
        back: dict[str, tuple[str, bool]] = {}  # stand-in -> (character, continues a word)

        def stand_in(c: str, table: dict[str, str], plane: int, continues: bool) -> str:
            s = table.get(c)
            if s is None:
                if len(table) >= 0xFFFE:
                    raise ConfigError(
                        "the corpus has more than 65,534 distinct characters: WordPiece training "
                        "cannot number them; use --kind bpe"
                    )
                s = table[c] = chr(plane + len(table))
                back[s] = (c, continues)
            return s

        def words() -> Iterator[str]:
            for text in texts:
                yield " ".join(
                    stand_in(w[0], first, 0xF0000, False) + "".join(stand_in(c, rest, 0x100000, True) for c in w[1:])
                    for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))
                )
            # every character is also a token of its own (WordPiece's alphabet: a word may start with one seen
            # only inside words): one-character words, which have no pairs, so no merge counts change
            yield " ".join(stand_in(c, first, 0xF0000, False) for c in list(rest) if c not in first)

        bpe = HFTokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
        bpe.train_from_iterator(words(), trainer=trainer)

        def written(piece: str) -> str:
            if piece in specials:
                return piece
            text = "".join(back[c][0] for c in piece)
            return "##" + text if back[piece[0]][1] else text

        vocab = {written(piece): i for piece, i in bpe.get_vocab().items()}
        tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.WordPiece(prefix="##")
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return cls(tok, pad_token="[PAD]")

    @classmethod
    def train_unigram(
        cls, texts: Iterable[str], vocab_size: int = 8000, extra_ids: int = 100, max_piece_length: int = 16
    ) -> Tokenizer:
        """Train a T5-style Unigram (SentencePiece) vocabulary: `<pad>` 0, `</s>` 1, `<unk>` 2, the learned
        pieces, then `extra_ids` sentinels with `<extra_id_0>` last (sentinel i has id vocab_size - 1 - i).

        vocab_size counts everything; a corpus too small for it yields fewer pieces (the sentinels still end the
        vocabulary). Text is NFKC-normalised, tabs and line breaks become spaces and spaces `▁`, so NFKC text of
        characters seen in training decodes back exactly, save a leading space and with line breaks as spaces;
        unseen characters become `<unk>`. encode(...,
        add_special_tokens=True) appends `</s>`, as T5's tokenizer does."""
        if extra_ids < 0:
            raise ConfigError(f"extra_ids must be 0 or more, not {extra_ids}")
        pieces = vocab_size - extra_ids
        if pieces <= len(T5_SPECIALS):
            raise ConfigError(
                f"vocab_size {vocab_size} leaves no room for pieces after {len(T5_SPECIALS)} "
                f"special tokens and {extra_ids} sentinels"
            )
        pad, eos, unk = T5_SPECIALS
        tok = HFTokenizer(models.Unigram())
        # tabs and line breaks become spaces (as SentencePiece's default normalisation does): a vocabulary trained
        # on lines would otherwise turn every line break of a document into <unk>
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"[\t\n\r\f\v]"), " ")])
        # "first": only the start of the text gets a `▁`, not text that follows a special token, so
        # "a<extra_id_0>b" decodes back without an invented space
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(
            vocab_size=pieces,
            special_tokens=list(T5_SPECIALS),
            unk_token=unk,
            max_piece_length=max_piece_length,
            show_progress=False,
        )
        try:
            tok.train_from_iterator(texts, trainer=trainer)
        except Exception as e:  # the Rust trainer raises a bare Exception ("not large enough to contain all chars")
            raise ConfigError(f"unigram training failed: {str(e).splitlines()[0]} (raise vocab_size)") from None
        # the trainer sums in hash-map order, so a piece's score differed in its last bits from one process to
        # the next, and pieces of equal score were listed in that order too: round the scores (to 1e-9, far
        # finer than any choice between two segmentations needs) and number the pieces by score, then by the
        # piece itself (the specials keep their places at the start)
        # The characters it must keep but did not learn as pieces come last, given falling scores in hash-set
        # order too: they get those scores in the characters' own order.
        model = json.loads(tok.to_str())["model"]
        vocab = [(p, round(float(v), 9)) for p, v in model["vocab"]]
        tail = len(vocab)
        while tail > 0 and len(vocab[tail - 1][0]) == 1 and vocab[tail - 1][0] not in T5_SPECIALS:
            tail -= 1
        vocab[tail:] = zip(sorted(p for p, _ in vocab[tail:]), sorted((v for _, v in vocab[tail:]), reverse=True))
        head = [pv for pv in vocab if pv[0] in T5_SPECIALS]
        body = sorted((pv for pv in vocab if pv[0] not in T5_SPECIALS), key=lambda pv: (-pv[1], pv[0]))
        ordered = sorted(head, key=lambda pv: T5_SPECIALS.index(pv[0])) + body
        tok.model = models.Unigram(ordered, unk_id=[p for p, _ in ordered].index(unk), byte_fallback=False)
        # added in reverse so that <extra_id_0> gets the highest id, as in T5's vocabulary
        tok.add_special_tokens([SENTINEL.format(i) for i in reversed(range(extra_ids))])
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}",
            pair=f"$A {eos} $B:1 {eos}:1",
            special_tokens=[(eos, tok.token_to_id(eos))],
        )
        return cls(tok, eos_token=eos, pad_token=pad, specials={"unk_token": unk})
