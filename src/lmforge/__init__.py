"""lmforge: the whole LLM lifecycle in plain, readable PyTorch."""

__version__ = "0.1.0"

from lmforge.errors import LmforgeError  # noqa: E402

__all__ = ["LmforgeError", "__version__"]
