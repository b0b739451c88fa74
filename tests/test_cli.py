"""The CLI: user errors exit 2 with one line and leave nothing behind; the verbs work. Through subprocesses,
except most config-value and missing-file cases, which run `cli.main` in-process (the same code path, without a
Python start-up each)."""

import json

import pytest
import yaml

from conftest import call_cli, run_cli


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("lmforge: error: ")
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def recipe(tmp_path, corpus, **sections):
    cfg = {
        "model": {"preset": "bench-gpt2", "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        "data": {"sources": [str(corpus)], "vocab_size": 280},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 0, "ckpt_every": 0, "peak_tflops": 1.0},
    }
    for k, v in sections.items():
        cfg[k].update(v)
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_missing_corpus(tmp_path):
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", str(recipe(tmp_path, tmp_path / "no-such-dir")), "--out", str(out))
    assert_user_error(r, "not found")
    assert not out.exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("   \n\n")
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", str(recipe(tmp_path, tmp_path / "c")), "--out", str(out))
    assert_user_error(r, "empty")
    assert not out.exists()


def test_non_utf8_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "latin1.txt").write_bytes("Café crème, señor\n".encode("latin-1") * 50)
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", str(recipe(tmp_path, tmp_path / "c")), "--out", str(out))
    assert_user_error(r, "latin1.txt", "not UTF-8")
    assert not out.exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("model.colour=red", "unknown config key 'model.colour'"),
        ("train.lr=-0.001", "train.lr must be > 0"),
        ("model.n_head=3", "does not divide model.d_model=32"),
        ("train.steps=ten", "train.steps must be an integer"),
        ("nokey", "is not key=value"),
        ("train.steps=.inf", "train.steps must be an integer"),
        ("train.lr=.nan", "train.lr must be a finite number"),
        ("model.preset=[a]", "unknown model preset"),
    ],
)
def test_bad_config_values(tmp_path, small_corpus, override, needle, capsys):
    out = tmp_path / "run"
    r = call_cli(
        capsys, "pretrain", "--config", str(recipe(tmp_path, small_corpus)), "--set", override, "--out", str(out)
    )
    assert_user_error(r, needle)
    assert not out.exists()


def test_unknown_key_in_yaml(tmp_path, small_corpus, capsys):
    p = recipe(tmp_path, small_corpus, train={"warmup": 10})
    r = call_cli(capsys, "pretrain", "--config", str(p), "--out", str(tmp_path / "run"))
    assert_user_error(r, "unknown config key 'train.warmup'", "warmup_steps")


def test_missing_config_file_and_model(tmp_path, capsys):
    assert_user_error(run_cli("pretrain", "--config", str(tmp_path / "nope.yaml")), "config file not found")
    assert_user_error(
        call_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "does not exist"
    )
    assert_user_error(call_cli(capsys, "info", str(tmp_path)), "config.json is missing")
    assert_user_error(call_cli(capsys, "pretrain", "--resume", "--out", str(tmp_path)), "nothing to resume")


def test_pretrain_generate_info_and_rerun_guard(tmp_path, small_corpus):
    out = tmp_path / "run"
    r = run_cli("pretrain", "--config", str(recipe(tmp_path, small_corpus)), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "validation: loss" in r.stdout
    g = run_cli(
        "generate",
        "--model",
        str(out / "model"),
        "--prompt",
        "ROMEO.",
        "--prompt",
        "JULIET.",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
        "--json",
    )
    assert g.returncode == 0, g.stderr
    rows = json.loads(g.stdout)
    assert [r["prompt"] for r in rows] == ["ROMEO.", "JULIET."] and all(isinstance(r["text"], str) for r in rows)
    greedy = (
        "generate",
        "--model",
        str(out / "model"),
        "--prompt",
        "ROMEO.",
        "--prompt",
        "JULIET. I",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    )
    eager, compiled = run_cli(*greedy), run_cli(*greedy, "--compile")
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert json.loads(compiled.stdout) == json.loads(eager.stdout)
    i = run_cli("info", str(out / "model"), "--json")
    assert i.returncode == 0 and json.loads(i.stdout)["config"]["d_model"] == 32
    again = run_cli("pretrain", "--config", str(recipe(tmp_path, small_corpus)), "--out", str(out))
    assert_user_error(again, "already holds a run", "--resume")
    too_long = run_cli("generate", "--model", str(out / "model"), "--prompt", "x", "--max-new-tokens", "100")
    assert_user_error(too_long, "exceeds the model's context")


def test_tokenizer_train_verb(tmp_path, small_corpus):
    r = run_cli(
        "tokenizer", "train", "--data", str(small_corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok")
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_info_on_preset():
    r = run_cli("info", "gpt2-124m")
    assert r.returncode == 0 and "124,439,808" in r.stdout


def test_section_that_is_not_a_mapping(tmp_path, small_corpus, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("model: gpt2-124m\n")
    assert_user_error(
        call_cli(capsys, "pretrain", "--config", str(p), "--out", str(tmp_path / "run")),
        "section 'model' must be a mapping",
    )


def test_info_on_every_family_preset_and_a_t5_directory(tmp_path):
    from lmforge.config import seq2seq_config
    from lmforge.info import model_info
    from lmforge.models.seq2seq import Seq2SeqLM

    assert model_info("bert-mini")["family"].startswith("encoder (BERT")
    t5 = model_info("t5-tiny")
    assert t5["family"] == "encoder-decoder (T5-style)" and t5["params"] == seq2seq_config("t5-tiny").num_params()
    m = Seq2SeqLM(seq2seq_config("t5-tiny", vocab_size=64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    m.save_pretrained(tmp_path / "t5")
    saved = model_info(tmp_path / "t5")
    assert saved["model_type"] == "t5" and saved["params"] == m.num_params()
