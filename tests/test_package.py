"""The package as a user gets it: a wheel built from this tree, installed into a fresh virtual environment that
sees the installed dependencies but not the source tree, runs `lmforge --version`, `python -m lmforge info` and a
20-step pre-training with the extras' modules blocked (the core alone), and names the extra `lmforge serve`
needs. Then the pieces in this process: the missing-extra errors, reports without matplotlib, `python -m lmforge`,
the torch check and the one version."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

import lmforge
from lmforge import MissingExtraError, check_torch, torch_version
from lmforge.errors import LmforgeError

ROOT = Path(__file__).resolve().parents[1]
# the modules of the extras (and fastapi's pydantic and starlette): blocked in the wheel's environment
EXTRA_MODULES = (
    "matplotlib",
    "sklearn",
    "rouge_score",
    "sacrebleu",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "llguidance",
    "datasketch",
)
CORE = {"torch", "numpy", "tokenizers", "safetensors", "gguf", "pyyaml", "tqdm", "jinja2"}


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**env, "PYTHONUNBUFFERED": "1"}
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what goes into it (a build in the tree would leave build/ and an
    egg-info folder there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(tree),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--disable-pip-version-check",
            "-w",
            str(tmp / "dist"),
        ],
        cwd=tmp,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = (tmp / "dist").glob("lmforge-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed, then a .pth file naming this environment's
    site-packages as plain paths (a path line adds the folder; the .pth files inside it, the editable install's
    among them, are not run), and one that blocks the extras' modules."""
    env = tmp_path_factory.mktemp("venv") / "env"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=env.parent)
    assert r.returncode == 0, r.stderr
    py = env / "bin" / "python"
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        cwd=env.parent,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    assert (purelib / "lmforge" / "__init__.py").is_file()
    (purelib / "_lmforge_test_deps.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    block = f"import sys; sys.modules.update(dict.fromkeys({EXTRA_MODULES}))\n"  # (a .pth line that runs)
    (purelib / "_lmforge_test_core_only.pth").write_text(block)
    return env


def test_the_wheel_holds_the_package_its_data_and_the_core_requirements(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    py_files = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "lmforge").rglob("*.py")}
    assert py_files <= names, sorted(py_files - names)
    info = f"lmforge-{lmforge.__version__}.dist-info"
    assert {"lmforge/py.typed", "lmforge/serve/static/index.html", f"{info}/licenses/LICENSE"} <= names
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {lmforge.__version__}\n" in meta
    assert "\nLicense-Expression: Apache-2.0\n" in meta
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
    core = [r for r in requires if "extra ==" not in r]
    assert {re.split(r"[<>=!~;\[ ]", r)[0].lower() for r in core} == CORE
    assert f"torch>={'.'.join(map(str, lmforge.TORCH_MIN))}" in core
    assert set(re.findall(r"^Provides-Extra: (.*)$", meta, re.M)) == {
        "serve",
        "structured",
        "eval",
        "plots",
        "data",
        "all",
        "dev",
    }


def test_the_installed_wheel_runs_the_core_verbs_alone(venv, tmp_path, small_corpus):
    py, lmforge_cmd = venv / "bin" / "python", venv / "bin" / "lmforge"
    r = _run(
        [str(py), "-c", "import lmforge, sys; print(lmforge.__file__); print(sys.modules.get('fastapi'))"], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    where, blocked = r.stdout.splitlines()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT / "src"), where
    assert blocked == "None"  # the extras are out of reach: what follows runs on the core alone

    r = _run([str(lmforge_cmd), "--version"], cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, f"lmforge {lmforge.__version__} (torch {torch_version()})\n"), r.stderr

    r = _run([str(py), "-m", "lmforge", "info", "gpt2-124m"], cwd=tmp_path)
    assert r.returncode == 0 and "parameters: 124,439,808" in r.stdout, r.stdout + r.stderr

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "bench-gpt2", "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64},
                "data": {"sources": [str(small_corpus)], "vocab_size": 300, "val_fraction": 0.2},
                "train": {
                    "seed": 7,
                    "steps": 8,
                    "batch_size": 4,
                    "seq_len": 64,
                    "lr": 3e-3,
                    "warmup_steps": 2,
                    "eval_every": 10,
                    "eval_batches": 2,
                    "ckpt_every": 10,
                    "log_every": 5,
                },
            }
        )
    )
    out = tmp_path / "run"
    r = _run(
        [
            str(lmforge_cmd),
            "pretrain",
            "--config",
            str(recipe),
            "--out",
            str(out),
            "--set",
            "train.steps=20",
            "--set",
            "train.optimizer=muon",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "split" not in json.loads(line)
    ]
    assert steps and steps[-1] == 20
    assert (out / "model" / "model.safetensors").is_file() and (out / "report" / "report.html").is_file()
    assert not (out / "report" / "loss.png").exists() and "loss.png" not in (out / "report" / "report.md").read_text()
    assert "pip install 'lmforge[plots]'" in r.stderr  # the report says why it has no plot

    r = _run([str(lmforge_cmd), "serve", "--model", str(out / "model")], cwd=tmp_path)
    assert (r.returncode, r.stderr) == (
        2,
        "lmforge: error: lmforge serve needs fastapi: pip install 'lmforge[serve]'\n",
    ), r.stderr


def test_a_missing_extra_is_one_line_and_exit_2(monkeypatch, capsys):
    from conftest import call_cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # (None in sys.modules: an import of it fails)
    for name in ("lmforge.serve", "lmforge.serve.app"):  # imported anew, with the package missing
        monkeypatch.delitem(sys.modules, name, raising=False)
    r = call_cli(capsys, "serve", "--model", "smollm2-135m-instruct")
    assert (r.returncode, r.stdout, r.stderr) == (
        2,
        "",
        "lmforge: error: lmforge serve needs fastapi: pip install 'lmforge[serve]'\n",
    )


def _grammar():
    from lmforge.generate.constrain import grammar_for

    return grammar_for(regex="a+")


def _classification():
    from lmforge.eval.classify import classification_metrics

    return classification_metrics([0, 1], [0, 1], ["a", "b"])


def _rouge():
    from lmforge.eval.generation import reference_scores

    return reference_scores(["a b"], ["a b"])


def _bleu():
    from lmforge.eval.generation import seq2seq_scores

    return seq2seq_scores(["a b"], ["a b"])


def _plot():
    from lmforge.report import pyplot

    return pyplot()


def _near_duplicates():
    from lmforge.data.clean import Cleaner

    return Cleaner()


@pytest.mark.parametrize(
    "module, use, message",
    [
        (
            "llguidance",
            _grammar,
            "structured output (a JSON schema, JSON object, regex, choices or tool calls) needs "
            "llguidance: pip install 'lmforge[structured]'",
        ),
        ("sklearn.metrics", _classification, "classification metrics needs scikit-learn: pip install 'lmforge[eval]'"),
        ("rouge_score.rouge_scorer", _rouge, "ROUGE scores needs rouge-score: pip install 'lmforge[eval]'"),
        ("sacrebleu", _bleu, "BLEU and chrF scores needs sacrebleu: pip install 'lmforge[eval]'"),
        ("matplotlib", _plot, "drawing PNG plots needs matplotlib: pip install 'lmforge[plots]'"),
        (
            "datasketch",
            _near_duplicates,
            "near-duplicate removal (data clean) needs datasketch: pip install 'lmforge[data]'",
        ),
    ],
    ids=["llguidance", "sklearn", "rouge-score", "sacrebleu", "matplotlib", "datasketch"],
)
def test_each_optional_package_names_its_extra(monkeypatch, module, use, message):
    use()  # installed here: the feature works
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as e:
        use()
    assert str(e.value) == message
    assert isinstance(e.value, LmforgeError) and isinstance(e.value, ImportError)


def test_reports_without_matplotlib_leave_the_plot_out(monkeypatch, tmp_path, capsys):
    from lmforge import report
    from lmforge.report import write_run_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in (
                {"step": 1, "loss": 3.0, "lr": 1e-3, "tok_per_s": 100.0, "mfu": 0.1},
                {"step": 2, "loss": 2.5, "lr": 1e-3, "tok_per_s": 100.0, "mfu": 0.1},
                {"step": 2, "split": "val", "loss": 2.6},
            )
        )
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(report, "_NOTED", [])
    capsys.readouterr()
    write_run_report(run)
    write_run_report(run)
    assert not (run / "report" / "loss.png").exists()
    assert "loss.png" not in (run / "report" / "report.md").read_text()
    assert "loss.png" not in (run / "report" / "report.html").read_text()
    assert capsys.readouterr().err.count("pip install 'lmforge[plots]'") == 1  # said once a process


def test_python_dash_m_lmforge_is_the_command(tmp_path):
    r = _run([sys.executable, "-m", "lmforge", "--version"], cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, f"lmforge {lmforge.__version__} (torch {torch_version()})\n"), r.stderr


@pytest.mark.parametrize("found", ["2.8.1", "2.2.0+cpu", "1.13.1", "", "nightly"])
def test_an_old_torch_is_one_line_naming_the_fix(found):
    need = ".".join(map(str, lmforge.TORCH_MIN))
    with pytest.raises(ImportError) as e:
        check_torch(found)
    text = str(e.value)
    assert "\n" not in text
    assert f"needs torch>={need}" in text and f"found torch {found}" in text
    assert f"pip install --upgrade 'torch>={need}'" in text


@pytest.mark.parametrize("found", ["2.9.0", "2.9.1+cu128", "2.10.0a0+git1234abc", "2.13.0+cpu", "3.0.0"])
def test_a_new_enough_torch_passes(found):
    check_torch(found)


def test_one_version_written_once():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lmforge.__version__"}
    need = ".".join(map(str, lmforge.TORCH_MIN))
    assert f"torch>={need}" in project["project"]["dependencies"]
    assert f"## [{lmforge.__version__}] - " in (ROOT / "CHANGELOG.md").read_text()
