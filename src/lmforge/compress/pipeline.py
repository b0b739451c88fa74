"""What `lmforge quantize` and `lmforge prune` do: load a model, measure it, compress it, measure it again, save.

Both print size, speed and (given evaluation data) quality before and after, and write a model directory that
`load_pretrained` reads like any other: quantized ones in the format described in `interop.quantized`, pruned ones
as plain model directories (zeros stay zeros; removed heads and neurons are gone from the shapes).
"""

from __future__ import annotations

import sys
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
from lmforge.models.decoder import DecoderLM
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


def check_eval_args(m, eval_data: list[str] | str | None, text_col: str | None, label_col: str | None) -> None:
    """What `measure` can do with the evaluation flags on this model: quality is perplexity on text for a decoder,
    accuracy on one labelled file for a classifier. Columns name a classifier's file; other models' evaluation
    data is noted as skipped."""
    files = [eval_data] if isinstance(eval_data, (str, Path)) else list(eval_data or [])
    classifier = getattr(m.config, "head", None) == "classify" and not isinstance(m, DecoderLM)
    if (text_col or label_col) and not (classifier and files):
        flags = " and ".join(f for f, v in (("--text-col", text_col), ("--label-col", label_col)) if v)
        raise LmforgeError(
            f"{flags} name the columns of a classifier's --eval-data file; "
            + ("give --eval-data" if classifier else "this model reads no labelled file: drop them")
        )
    if classifier and len(files) > 1:
        raise LmforgeError(f"a classifier is measured on one labelled --eval-data file, got {len(files)}")
    if files and not (classifier or isinstance(m, DecoderLM)):
        head = getattr(m.config, "head", None)
        print(
            f"lmforge: note: --eval-data skipped: quality is measured for decoders (perplexity) and classifiers "
            f"(accuracy); this model is {type(m).__name__}" + (f" ({head} head)" if head else ""),
            file=sys.stderr,
        )


def quantize(
    model: str,
    mode: str,
    out: str | Path,
    group_size: int | None = None,
    eval_data: list[str] | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    say=print,
    device: str = "cpu",
) -> dict:
    """Quantize `model` (int8, int4 or int8-dynamic) into the model directory `out`. group_size: int4's weights
    per scale (default 64)."""
    if device != "cpu":
        raise LmforgeError(
            f"quantize --device {device}: lmforge's int8 / int4 kernels, which it measures the "
            f"quantized model on, are CPU ones; use --device cpu"
        )
    if mode not in MODES:
        raise LmforgeError(f"quantization mode {mode!r} is not supported; choose one of {', '.join(MODES)}")
    if group_size is not None and mode != "int4":
        raise LmforgeError(f"--group-size sets int4's groups; --mode {mode} keeps one scale per row: drop it")
    group_size = 64 if group_size is None else group_size
    if group_size < 2 or group_size % 2:
        raise LmforgeError(f"--group-size must be an even number >= 2, got {group_size}")
    check_output_dir(out)
    m, tok = _load(model)
    check_quantizable(m, mode, group_size)  # a mode this model cannot take fails before the measurements
    check_eval_args(m, eval_data, text_col, label_col)
    before = measure(m, tok, eval_data, text_col, label_col)
    kept = _file_int4(model) if mode == "int4" else None
    if kept is not None:  # a GGUF's own 4-bit blocks, kept as stored: requantizing them would only lose
        m, group_size = kept, FOUR_BIT_GROUP
        say(
            f"int4: the file's own 4-bit blocks are kept as stored (groups of {FOUR_BIT_GROUP}; --group-size "
            "does not apply)"
        )
    else:
        quantize_model(m, mode, group_size)
    after = measure(m, tok, eval_data, text_col, label_col)
    save_quantized(m, out, tok)
    say(comparison(before, after, mode))
    result = {
        "model": str(model),
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "before": before,
        "after": after,
        "out": str(out),
    }
    write_json(Path(out) / "compression.json", result)
    say(f"saved: {out}")
    return result


def prune(
    model: str,
    out: str | Path,
    sparsity: float | None = None,
    structure: str | None = None,
    fraction: float | None = None,
    recover_steps: int = 0,
    recover_data: str | None = None,
    eval_data: list[str] | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    say=print,
    device: str = "cpu",
) -> dict:
    """Prune `model` (magnitude to `sparsity`, or `fraction` of its heads / neurons), optionally fine-tune it
    for `recover_steps` on `recover_data`, and save it to `out`; on `device`."""
    check_args(sparsity, structure, fraction)
    check_number("--recover-steps", recover_steps, 0, integer=True)
    if recover_steps and not recover_data:
        raise LmforgeError(
            "--recover-steps needs --recover-data (text for a decoder, a labelled file for a classifier)"
        )
    if recover_data and not recover_steps:
        raise LmforgeError("--recover-data is read by the recovery fine-tuning: give --recover-steps N too")
    check_output_dir(out)
    m, tok = _load(model, device)
    check_eval_args(m, eval_data, text_col, label_col)
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
