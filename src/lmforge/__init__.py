"""lmforge: the whole LLM lifecycle in plain, readable PyTorch.

This module holds the one version string (pyproject.toml reads it), the torch check that runs once at
`import lmforge`, and `require`, the one way a module loads an optional package (an extra of the pip package).
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

__version__ = "0.2.0"

from lmforge.errors import LmforgeError  # noqa: E402

# The oldest torch with every API lmforge calls: torch.optim.Muon with adjust_lr_fn="match_rms_adamw" (2.9);
# the rest is older (FSDP2's torch.distributed.fsdp.fully_shard 2.6, scaled_dot_product_attention's enable_gqa
# and torch.optim.Adafactor 2.5, torch.get_autocast_dtype and torch.library.custom_op 2.4)
TORCH_MIN = (2, 9)


class MissingExtraError(LmforgeError, ImportError):
    """A feature whose optional package is not installed; the message names the extra that brings it."""


# the pip name of an optional module whose import name differs
PIP_NAMES = {"sklearn": "scikit-learn", "rouge_score": "rouge-score"}


def missing_extra(error: ImportError, feature: str, extra: str) -> MissingExtraError:
    """The one-line error for a failed import of an optional package: "FEATURE needs PACKAGE: pip install
    'lmforge[EXTRA]'". feature: what the user asked for ("lmforge serve", "ROUGE scores")."""
    top = (error.name or "").split(".")[0]
    package = PIP_NAMES.get(top, top) or str(error)
    return MissingExtraError(f"{feature} needs {package}: pip install 'lmforge[{extra}]'")


def require(module: str, feature: str, extra: str) -> ModuleType:
    """`module` imported, or missing_extra's MissingExtraError (for a package a module loads where it is used;
    one imported at the top of a module goes in a try block that raises missing_extra)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_extra(e, feature, extra) from None


def available(module: str) -> bool:
    """Whether an optional package imports (a feature that is only an extra, such as a report's plots)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def torch_version() -> str | None:
    """The installed torch's version, read from its package metadata (importing torch takes over a second)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        try:  # a torch without package metadata (built in place, vendored)
            import torch
        except ImportError:
            return None
        return torch.__version__


def check_torch(found: str | None = None) -> None:
    """ImportError, on one line, when torch is missing or older than TORCH_MIN (found: a version to check instead
    of the installed one)."""
    found = torch_version() if found is None else found
    need = ".".join(map(str, TORCH_MIN))
    if found is None:
        raise ImportError(
            f"lmforge {__version__} needs torch>={need}, and torch is not installed: pip install 'torch>={need}'"
        )
    m = re.match(r"(\d+)\.(\d+)", found)
    if m is None or tuple(map(int, m.groups())) < TORCH_MIN:
        raise ImportError(
            f"lmforge {__version__} needs torch>={need}, found torch {found}: pip install --upgrade 'torch>={need}'"
        )


check_torch()

__all__ = [
    "LmforgeError",
    "MissingExtraError",
    "TORCH_MIN",
    "__version__",
    "available",
    "check_torch",
    "missing_extra",
    "require",
    "torch_version",
]
