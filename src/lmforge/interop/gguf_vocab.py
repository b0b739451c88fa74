"""GGUF tokenizer metadata (`tokenizer.ggml.*`) <-> an lmforge Tokenizer, read with a `gguf.GGUFReader` and
written with a `gguf.GGUFWriter`.

A GGUF carries no tokenizer.json: only the vocabulary, token types, merges or scores, special ids and a name for the
pre-tokenizer (`tokenizer.ggml.pre`), which llama.cpp maps to the regexes that split text before BPE. Two model kinds
are rebuilt here as `tokenizers` pipelines:
  * "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM, ...): merges are stored, the regexes come from the
    pre-tokenizer's name (PRE_TOKENIZERS);
  * "llama": SentencePiece BPE (Llama 2, Mistral 7B, ...): spaces as `▁`, `<0xNN>` byte tokens for characters
    outside the vocabulary, and no merges but a score per token (SentencePiece joins the adjacent pair whose joined
    piece scores highest), from which the merges are recovered.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import ConfigError, ModelLoadError
from lmforge.tokenizer import Tokenizer

KINDS = ("gpt2", "llama")
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"  # SentencePiece's spelling of a space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# The split regexes, in `tokenizers`' (Oniguruma) syntax, spelled as the models' own tokenizer.json files spell them
# (llama.cpp rewrites a few for std::regex, e.g. `(?i:'s)` as `'[sS]`; the splits are the same).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# words in upper-then-lower case runs (CamelCase splits), digits one at a time
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# as Tekken's, with contractions kept on their word and digits in groups of up to 3
GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT = r"\p{N}"
# CJK ideographs, U+0800..U+4E00 and Hangul, as one run each (DeepSeek's split)
CJK_RUN = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}]+"

# `tokenizer.ggml.pre` -> the regexes that split text, applied one after the other (each piece of one split is split
# by the next; what a regex does not match stays a piece of its own), before the byte-level mapping.
# add_tokenizer writes the first name whose regexes match a tokenizer's, so each group's usual name comes first.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (GPT2,),  # GPT-2, Phi-2, lmforge's Tokenizer.train_bpe; llama.cpp's name for GPT-2's split
    "gpt2": (GPT2,),  # (the model kind's name, accepted as a pre-tokenizer name too)
    "default": (GPT2,),  # files written before llama.cpp named pre-tokenizers (llama.cpp's own default differs)
    "phi-2": (GPT2,),  # Phi-2
    "olmo": (GPT2,),  # OLMo
    "mpt": (GPT2,),  # MPT
    "llama-bpe": (LLAMA3,),  # Llama 3, 3.1, 3.2, 3.3
    "llama3": (LLAMA3,),  # Llama 3 (older converters' name)
    "llama-v3": (LLAMA3,),  # Llama 3 (older converters' name)
    "dbrx": (LLAMA3,),  # DBRX
    "smaug-bpe": (LLAMA3,),  # Smaug (a Llama 3 fine-tune)
    "falcon3": (LLAMA3,),  # Falcon 3
    "qwen2": (QWEN2,),  # Qwen1.5, Qwen2, Qwen2.5, Qwen3
    "deepseek-r1-qwen": (QWEN2,),  # DeepSeek-R1 distilled into Qwen2.5
    "stablelm2": (QWEN2,),  # StableLM 2
    "qwen35": (QWEN35,),  # Qwen3.5
    "smollm": (DIGIT, GPT2),  # SmolLM, SmolLM2
    "starcoder": (DIGIT, GPT2),  # StarCoder, StarCoder2
    "refact": (DIGIT, GPT2),  # Refact
    "command-r": (DIGIT, GPT2),  # Command-R, Command-R+
    "codeshell": (DIGIT, GPT2),  # CodeShell
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"),  # Falcon 7B/40B
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_RUN, DIGIT),  # DeepSeek Coder (v1)
    "tekken": (TEKKEN,),  # Mistral NeMo, Pixtral, Ministral (Mistral's Tekken vocabulary)
    "gpt-4o": (GPT4O,),  # GPT-4o's o200k split: Llama 4 and others
    "llama4": (GPT4O,),  # Llama 4
}
# llama.cpp takes a whole pre-token from the vocabulary before merging (tokenizers' ignore_merges), and adds BOS
# unless the file says otherwise, for these
WHOLE_WORDS = frozenset({"llama-bpe", "llama3", "llama-v3", "falcon3", "tekken"})


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# --- GGUF -> Tokenizer -----------------------------------------------------------------------------------------------


def tokenizer_from_gguf(reader, where: str) -> Tokenizer:
    """The tokenizer a GGUF's `tokenizer.ggml.*` metadata describes, with its special tokens and chat template, so
    that a model read from the file tokenizes as llama.cpp does."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in KINDS:
        raise ModelLoadError(
            f"{where}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            f"'llama' SentencePiece BPE)"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens", []))
    if not tokens:
        raise ModelLoadError(f"{where}: the GGUF has no tokenizer.ggml.tokens, so no vocabulary to tokenize with")
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if len(types) != len(tokens):
        raise ModelLoadError(f"{where}: {len(types)} token types for {len(tokens)} tokens; the file is damaged")
    stored = _field(reader, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in stored] if stored is not None else None
    if kind == "gpt2":
        pre = _field(reader, "tokenizer.ggml.pre") or "default"
        tok = _byte_level(tokens, merges or [], pre, where)
        add_bos_default = pre in WHOLE_WORDS
    else:
        scores = _field(reader, "tokenizer.ggml.scores")
        if merges is None:
            merges = _merges_from_scores(tokens, scores or [-float(i) for i in range(len(tokens))], types)
        unk = _maybe_int(_field(reader, "tokenizer.ggml.unknown_token_id"))
        tok = _sentencepiece(
            tokens,
            merges,
            unk=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None,
            prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        )
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    # control tokens (and SentencePiece's <unk>) are special; user-defined ones (<think>) are matched whole but kept
    # in decoded text
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if t and ty in (UNKNOWN, CONTROL)
        ]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if t and ty == USER_DEFINED]
    )

    def name(key: str) -> str | None:
        i = _maybe_int(_field(reader, key))
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        tok.post_processor = _template(tok, bos if add_bos else None, eos if add_eos else None)
    return Tokenizer(
        tok,
        eos_token=eos,
        bos_token=bos,
        pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        specials={"unk_token": name("tokenizer.ggml.unknown_token_id")},
    )


def _maybe_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _byte_level(tokens: list[str], merges: list[tuple[str, str]], pre: str, where: str) -> HFTokenizer:
    """Byte-level BPE split as `pre` names; an unknown name is split as GPT-2 does (llama.cpp would refuse it)."""
    splits = PRE_TOKENIZERS.get(pre)
    if splits is None:
        print(
            f"{where}: GGUF pre-tokenizer {pre!r} is unknown to lmforge; splitting text as GPT-2 does", file=sys.stderr
        )
        splits = PRE_TOKENIZERS["gpt-2"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in WHOLE_WORDS))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece keeps no merges: it joins the adjacent pair whose joined piece is in the vocabulary and scores
    highest. BPE does the same given, as merges, every way to cut each piece in two vocabulary pieces, ranked by the
    piece's score (then by id, as SentencePiece numbers pieces best first). Only normal pieces take part: control,
    user-defined and byte tokens are never formed by joining."""
    pieces = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = [
        (-float(scores[i]), i, k, t[:k], t[k:])
        for t, i in pieces.items()
        for k in range(1, len(t))
        if t[:k] in pieces and t[k:] in pieces
    ]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece(tokens: list[str], merges: list[tuple[str, str]], unk: str | None, prefix: bool) -> HFTokenizer:
    """SentencePiece BPE as `tokenizers` writes Llama 2's: spaces become `▁` (and one is put before the text, and
    after each special token, as llama.cpp does when add_space_prefix), characters outside the vocabulary become
    their `<0xNN>` byte tokens, and decoding undoes both."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    spaces = [normalizers.Replace(" ", SPACE)]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else []) + spaces)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _template(tok: HFTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """encode(..., add_special_tokens=True) adds BOS (and EOS) as llama.cpp does for the file."""
    head, tail = ([bos] if bos else []), ([eos] if eos else [])
    single = " ".join(head + ["$A"] + tail)
    pair = " ".join(head + ["$A"] + tail + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail])
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(head + tail)]
    )


# --- Tokenizer -> GGUF -----------------------------------------------------------------------------------------------


def add_tokenizer(writer, tok: Tokenizer) -> None:
    """Write a tokenizer's `tokenizer.ggml.*` metadata (and chat template) with a `gguf.GGUFWriter`, so that llama.cpp
    (and tokenizer_from_gguf) tokenize as it does: byte-level BPE as "gpt2" with merges and its pre-tokenizer's name,
    BPE with byte fallback and `▁` for spaces as "llama" with scores that replay its merges."""
    spec = json.loads(tok.tok.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise ConfigError(
            f"a {model['type']} tokenizer cannot be written to GGUF here: only byte-level BPE and "
            f"SentencePiece-style BPE (byte fallback, '▁' for spaces) are supported"
        )
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    if kind == "llama" and not _spaces_as_metaspace(spec):
        raise ConfigError("a BPE tokenizer with byte fallback must write spaces as '▁' to be written to GGUF")
    splits = _byte_level_splits(spec.get("pre_tokenizer")) if kind == "gpt2" else None
    if kind == "gpt2" and splits is None:
        raise ConfigError(
            "this BPE tokenizer is neither byte-level (no ByteLevel pre-tokenizer) nor SentencePiece-style "
            "(byte fallback): GGUF cannot describe it"
        )
    unk_id = tok.token_id(tok.unk_token)
    tokens, types = _tokens_and_types(tok.tok, kind, unk_id)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_pre_name(splits))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_scores(tokens, merges))
        writer.add_token_types(types)
        writer.add_add_space_prefix(_space_prefix(spec))
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.token_id(tok.pad_token), "unk": unk_id}
    add_bos, add_eos, template_bos = _added_specials(spec, tok.tok)
    if ids["bos"] is None and template_bos is not None:
        ids["bos"] = template_bos
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        if ids[key] is not None:
            add(ids[key])
    # written even when false: llama.cpp adds BOS by default for SentencePiece and Llama 3 vocabularies
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _tokens_and_types(tok: HFTokenizer, kind: str, unk_id: int | None) -> tuple[list[str], list[int]]:
    """Every id's token as the vocabulary spells it (byte-level strings stay byte-level), with llama.cpp's type;
    ids missing from the vocabulary get placeholders of type UNUSED, so that ids keep their places."""
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max(vocab.values(), default=-1) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = BYTE if kind == "llama" and BYTE_TOKEN.fullmatch(t) else NORMAL
    for i, added in tok.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    if kind == "llama" and unk_id is not None:
        types[unk_id] = UNKNOWN
    return tokens, types


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Scores under which SentencePiece's rule (join the best-scoring pair) replays the merges in order: a piece
    scores minus the rank of the first merge that forms it, and every other token below all of them."""
    index = {t: i for i, t in enumerate(tokens)}
    scores = [-float(len(merges))] * len(tokens)
    formed: set[int] = set()
    for rank, m in enumerate(merges):
        i = index.get(m.replace(" ", "", 1))
        if i is not None and i not in formed:
            formed.add(i)
            scores[i] = -float(rank)
    return scores


def _spaces_as_metaspace(spec: dict) -> bool:
    """Whether the tokenizer writes spaces as `▁` (Llama 2's normalizer, or a Metaspace pre-tokenizer)."""
    return any(
        p.get("type") == "Replace" and p.get("pattern", {}).get("String") == " " and p.get("content") == SPACE
        for p in _flat(spec.get("normalizer"), "normalizers")
    ) or any(p.get("type") == "Metaspace" for p in _flat(spec.get("pre_tokenizer"), "pretokenizers"))


def _space_prefix(spec: dict) -> bool:
    """Whether a `▁` goes before the text (llama.cpp's add_space_prefix)."""
    if any(
        p.get("type") == "Prepend" and p.get("prepend") == SPACE for p in _flat(spec.get("normalizer"), "normalizers")
    ):
        return True
    return any(
        p.get("type") == "Metaspace"
        and p.get("prepend_scheme", "always" if p.get("add_prefix_space") else "never") != "never"
        for p in _flat(spec.get("pre_tokenizer"), "pretokenizers")
    )


def _flat(part: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer or pre-tokenizer, a Sequence's in order."""
    if part is None:
        return []
    return [q for p in part[key] for q in _flat(p, key)] if part.get("type") == "Sequence" else [part]


def _byte_level_splits(pre: dict | None) -> tuple[str, ...] | None:
    """The regexes a byte-level pre-tokenizer splits raw text by, in order (ByteLevel's own regex is GPT-2's, a
    Digits step is a regex on digits); None unless it ends in ByteLevel and splits by regexes only."""
    steps = _flat(pre, "pretokenizers")
    if not steps or steps[-1].get("type") != "ByteLevel":
        return None
    splits = []
    for p in steps[:-1]:
        pattern = p.get("pattern", {})
        if p["type"] == "Split" and "Regex" in pattern and p.get("behavior") == "Isolated" and not p.get("invert"):
            splits.append(pattern["Regex"])
        elif p["type"] == "Digits":
            splits.append(DIGIT if p.get("individual_digits") else DIGIT + "+")
        else:
            return None
    if steps[-1].get("use_regex", True):
        splits.append(GPT2)
    return tuple(splits)


def _pre_name(splits: tuple[str, ...]) -> str:
    """The `tokenizer.ggml.pre` that names these regexes, GPT-2's (with a warning) when none does."""
    for name, regexes in PRE_TOKENIZERS.items():
        if regexes == splits:
            return name
    print(
        "the tokenizer's pre-tokenizer matches none that llama.cpp names: writing 'gpt-2', so llama.cpp will split "
        "text as GPT-2 does",
        file=sys.stderr,
    )
    return "gpt-2"


def _added_specials(spec: dict, tok: HFTokenizer) -> tuple[bool, bool, int | None]:
    """(adds BOS, adds EOS, the id of the token it puts first) from a TemplateProcessing post-processor."""
    post = spec.get("post_processor")
    steps = post.get("processors", []) if post and post.get("type") == "Sequence" else [post] if post else []
    for p in steps:
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            first, last = p["single"][0], p["single"][-1]
            bos = tok.token_to_id(first["SpecialToken"]["id"]) if "SpecialToken" in first else None
            return "SpecialToken" in first, "SpecialToken" in last, bos
    return False, False, None
