from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

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
