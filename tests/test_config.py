from pathlib import Path

import pytest
import torch
import yaml

from lmforge.config import load_run_config, model_config, run_config_from_dict
from lmforge.errors import ConfigError
from lmforge.models.family import FAMILIES
from lmforge.quickstart import QUICKSTART

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quickstart_yaml_equals_embedded_default():
    from_file = load_run_config(CONFIGS / "quickstart.yaml")
    assert from_file == run_config_from_dict(QUICKSTART)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_is_valid(path):
    """Pre-training recipes load as run configs; fine-tuning recipes (a `task:` key) resolve for their task."""
    import yaml

    from lmforge.tune.recipe import resolve

    task = (yaml.safe_load(path.read_text()) or {}).get("task")
    if task:
        cfg, args = resolve(task, path)
        assert args["model"] and args["data"] and cfg.method in ("full", "top-k", "lora", "qlora")
    else:
        load_run_config(path)


def test_overrides_are_typed():
    cfg = load_run_config(
        base=QUICKSTART,
        overrides=[
            "train.lr=3e-4",
            "model.n_layer=2",
            "train.compile=true",
            "data.sources=[a, b]",
            "train.min_lr=null",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.model.n_layer == 2 and cfg.train.compile is True
    assert cfg.data.sources == ["a", "b"] and cfg.train.min_lr is None


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        model_config("gpt5")
    with pytest.raises(ConfigError, match="n_kv_head=4 must divide model.n_head=6"):
        model_config("llama-small", n_kv_head=4)
    with pytest.raises(ConfigError, match=r"train.batch_size must be a whole number >= 1, got 0"):
        load_run_config(base=QUICKSTART, overrides=["train.batch_size=0"])
    with pytest.raises(ConfigError, match="seq_len=512 exceeds model.max_seq_len=256"):
        load_run_config(base=QUICKSTART, overrides=["train.seq_len=512"])


def test_run_settings_are_declared_once_and_listed_by_pretrain_help(capsys):
    """Every data / train key is a declared setting (help, range): `pretrain --help` lists each one from it, and
    the same declaration checks a value (a wrong type, a value out of range or not among the choices)."""
    from lmforge.cli import main
    from lmforge.config import run_settings

    rows = run_settings()
    assert {k for k, _, _ in rows} >= {"train.lr", "train.grad_checkpoint", "data.val_fraction", "data.sources"}
    assert all(h for _, _, h in rows)  # every one has its help
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    shown = capsys.readouterr().out
    for key, _, hint in rows:
        assert f"--set {key}=" in shown and hint.split()[0] in shown, key
    with pytest.raises(ConfigError, match=r"train.optimizer must be one of adamw, adafactor, muon, got 'sgd'"):
        load_run_config(base=QUICKSTART, overrides=["train.optimizer=sgd"])
    with pytest.raises(ConfigError, match=r"train.beta2 must be in \[0, 1\), got 1"):
        load_run_config(base=QUICKSTART, overrides=["train.beta2=1"])
    with pytest.raises(ConfigError, match=r"train.grad_checkpoint must be true or false"):
        load_run_config(base=QUICKSTART, overrides=["train.grad_checkpoint=maybe"])


def test_config_yaml_round_trip(tmp_path):
    cfg = load_run_config(base=QUICKSTART)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    again = load_run_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load(cfg.to_yaml())["model"]["d_model"] == 256


@pytest.mark.parametrize(
    "family, preset", [(f.name, p) for f in FAMILIES.values() for p in f.presets], ids=lambda v: str(v)
)
def test_parameter_count_formula_matches_the_modules(family, preset):
    """The config's hand-written count (used for FLOPs and `lmforge info` without building the model) equals the
    count derived from the modules, for every preset of every family; built on the meta device, so the 124M and
    135M presets cost no memory."""
    f = FAMILIES[family]
    cfg = f.config_cls(**{**f.presets[preset]})
    with torch.device("meta"):
        model = f.model_cls(cfg)
    assert model.num_params() == cfg.num_params() > 0


@pytest.mark.parametrize("task", ["classify", "qa", "chat", "dpo", "grpo", "seq2seq"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_cli_and_python_api_resolve_the_same_recipe(task, method):
    """`lmforge finetune TASK` with only --model/--data/--method and `finetune_TASK(model, data, out)` run with the
    same settings: the FinetuneConfig (task_config is what a task function uses when given none) and every task
    argument's default in the function's signature."""
    import inspect

    from lmforge.tune.recipe import _TASK_FUNCTIONS
    from lmforge.tune.tasks import TASK_ARGS, resolve, task_config

    model = "t5-tiny" if task == "seq2seq" else "some/model"  # (seq2seq: a preset, trained from scratch)
    cfg, args = resolve(task, flags={"model": model, "data": "some.jsonl", "method": method})
    assert cfg == task_config(task, method=method, model=model)
    fn = _TASK_FUNCTIONS[task]()
    params = inspect.signature(fn).parameters
    for name, default in TASK_ARGS[task].items():
        if name in ("model", "data", "out"):
            continue
        assert name in params, f"finetune_{task} lacks the argument {name}"
        assert params[name].default == default == args[name], (task, name)
