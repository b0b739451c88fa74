"""What `lmforge quantize` and `lmforge prune` do: load a model, measure it, compress it, measure it again, save.

Both print size, speed and (given evaluation data) quality before and after, and write a model directory that
`load_pretrained` reads like any other: quantized ones in the format described in `interop.quantized`, pruned ones
as plain model directories (zeros stay zeros; removed heads and neurons are gone from the shapes).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.compress.measure import comparison, measure
from lmforge.compress.prune import check_args, prune_model, recover, sparsity_of
from lmforge.config import check_number
from lmforge.errors import LmforgeError
from lmforge.files import write_json
from lmforge.interop import load_pretrained, resolve_model_path
from lmforge.interop.gguf import FOUR_BIT_GROUP
from lmforge.interop.hf import check_output_dir
from lmforge.interop.quantized import save_quantized
from lmforge.nn.quant import MODES, check_quantizable, quantize_model


def _load(model: str, device: str = "cpu"):
    m, tok = load_pretrained(model, device=device)
    if getattr(m, "quantization", None):
        raise LmforgeError(f"{model} is already quantized; start from the full-precision model")
    return m, tok


def _file_int4(model: str):
    """The int4 model of a GGUF whose Linear weights are 4-bit blocks (load_pretrained's `auto`), else None."""
    p = resolve_model_path(model)
    if not (p.is_file() and p.suffix == ".gguf"):
        return None
    m, _ = load_pretrained(p, quantize="auto")
    return m if (getattr(m, "quantization", None) or {}).get("mode") == "int4" else None


def quantize(model: str, mode: str, out: str | Path, group_size: int = 64, eval_data: list[str] | None = None,
             text_col: str | None = None, label_col: str | None = None, say=print, device: str = "cpu") -> dict:
    """Quantize `model` (int8, int4 or int8-dynamic) into the model directory `out`."""
    if device != "cpu":
        raise LmforgeError(f"quantize --device {device}: lmforge's int8 / int4 kernels, which it measures the "
                           f"quantized model on, are CPU ones; use --device cpu")
    if mode not in MODES:
        raise LmforgeError(f"quantization mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    if group_size < 2 or group_size % 2:
        raise LmforgeError(f"--group-size must be an even number >= 2, got {group_size}")
    check_output_dir(out)
    m, tok = _load(model)
    check_quantizable(m, mode, group_size)  # a mode this model cannot take fails before the measurements
    before = measure(m, tok, eval_data, text_col, label_col)
    kept = _file_int4(model) if mode == "int4" else None
    if kept is not None:  # a GGUF's own 4-bit blocks, kept as stored: requantizing them would only lose
        m, group_size = kept, FOUR_BIT_GROUP
        say(f"int4: the file's own 4-bit blocks are kept as stored (groups of {FOUR_BIT_GROUP}; --group-size "
            "does not apply)")
    else:
        quantize_model(m, mode, group_size)
    after = measure(m, tok, eval_data, text_col, label_col)
    save_quantized(m, out, tok)
    say(comparison(before, after, mode))
    result = {"model": str(model), "mode": mode, "group_size": group_size if mode == "int4" else None,
              "before": before, "after": after, "out": str(out)}
    write_json(Path(out) / "compression.json", result)
    say(f"saved: {out}")
    return result


def prune(model: str, out: str | Path, sparsity: float | None = None, structure: str | None = None,
          fraction: float | None = None, recover_steps: int = 0, recover_data: str | None = None,
          eval_data: list[str] | None = None, text_col: str | None = None, label_col: str | None = None,
          say=print, device: str = "cpu") -> dict:
    """Prune `model` (magnitude to `sparsity`, or `fraction` of its heads / neurons), optionally fine-tune it
    for `recover_steps` on `recover_data`, and save it to `out`; on `device`."""
    check_args(sparsity, structure, fraction)
    check_number("--recover-steps", recover_steps, 0, integer=True)
    if recover_steps and not recover_data:
        raise LmforgeError("--recover-steps needs --recover-data (text for a decoder, a labelled file for a "
                           "classifier)")
    check_output_dir(out)
    m, tok = _load(model, device)
    before = measure(m, tok, eval_data, text_col, label_col)
    info = prune_model(m, sparsity, structure, fraction)
    masks = info.pop("masks")
    label = f"{structure} -{fraction:.0%}" if structure else f"sparsity {sparsity:.0%}"
    if recover_steps:
        losses = recover(m, tok, recover_data, recover_steps, masks, text_col=text_col, label_col=label_col)
        info["recovery_loss"] = [losses[0], losses[-1]]
        say(f"recovery: {recover_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    info["zero_share"] = sparsity_of(m)
    after = measure(m, tok, eval_data, text_col, label_col)
    m.save_pretrained(out, tokenizer=tok)
    say(comparison(before, after, label))
    result = {"model": str(model), **info, "before": before, "after": after, "out": str(out)}
    write_json(Path(out) / "compression.json", result)
    say(f"saved: {out}")
    return result
