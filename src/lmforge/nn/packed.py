"""Inference-time Linear layers with weights prepacked for oneDNN (CPU only).

Decoding multiplies a handful of rows by every weight matrix, once per token. PyTorch's default CPU path for
such skinny products (MKL GEMV / small GEMM on the [out, in] weight) streams weights at well under the memory
bandwidth, and gets worse at batch 8. oneDNN with the weight reordered once into its blocked layout (what
`torch.compile`'s CPU freezing does) reads them several times faster. `packed_linears(model)` swaps every
nn.Linear's forward for the packed one while the context is open.

Projections that read the same input are fused into one packed matrix: an attention layer's q, k and v, and a
gated MLP's gate and up (plain Linear layers, or int8 weight-only ones from `--quantize int8`). One product over
the stacked weights replaces three (two) calls, so a decoding step of a 30-block model makes 121 matrix calls
instead of 211, and each call's fixed cost (dispatch, oneDNN primitive lookup, waking the threads, and for int8
converting the input to bfloat16) is paid less often. `fused_outputs` is how Attention and MLP ask for it.

The packed and fused copies are cached on the modules (keyed by the weight's storage and version, so a weight
that changes is repacked), which costs one extra copy of the Linear weights in memory (for int8, of the fused
projections); `release_packed(model)` frees them. Results match the plain path to float rounding (about 1e-6
relative).

Compiled decoding of a single sequence (`packed_linears(..., gemv=True)`, what `generate(compile=True)` uses at
batch 1) takes a third way. Each product is then one row times a matrix, and written as an elementwise multiply
and a sum over the inputs, `(W * x).sum(-1)`, inductor turns it into one vectorised loop that streams the
weights at the speed of a plain `sum` over memory, where PyTorch's own GEMV kernels (MKL, or oneDNN prepacked)
reach about 55-70% of it on the CPUs measured here. Nothing is copied or fused for these: sibling projections
become separate loops over the same input (inductor runs them in one pass). Int8 weight-only layers keep their
kernel (inductor's loop loads int8 weights eight at a time through a slow partial-vector path, measured 1.5 GB/s).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.nn.init import aligned
from lmforge.nn.quant import Int8Linear

_ATTR = "_lmforge_packed"


def can_pack(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    if _OPAQUE is not None and torch.compiler.is_compiling():
        return _OPAQUE(x, packed, bias, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _opaque_op():
    """The packed product as a custom op that torch.compile calls as it is: inductor's own lowering of this
    oneDNN op expects weights it packed itself (with `freezing`), and rejects ours."""
    if not hasattr(torch.library, "custom_op"):  # torch < 2.4: compiled decoding then runs unpacked
        return None

    @torch.library.custom_op("lmforge::packed_linear", mutates_args=())
    def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @packed_linear.register_fake
    def _(x, packed, bias, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    return packed_linear


_OPAQUE = _opaque_op()


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _linear(x, getattr(self, _ATTR)[1], self.bias, self.out_features)


def _pack(m: nn.Linear, batch_hint: int) -> None:
    key = (m.weight.data_ptr(), m.weight._version, m.weight.dtype)
    cached = getattr(m, _ATTR, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(aligned(m.weight.detach()), batch_hint)
        setattr(m, _ATTR, (key, packed))


def _one_row(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() and x.numel() == x.size(-1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (one row) times weight [N, K]^T as multiply-and-sum, for inductor to compile into one loop over
    the weight. The view of x's own storage makes inductor compute x into a buffer first: otherwise it inlines
    x's producer (a norm, an activation) into the loop and recomputes it once per weight row, which halves the
    speed."""
    x = torch.as_strided(x, x.shape, x.stride())
    y = (weight * x[..., None, :]).sum(-1)
    return y if bias is None else y + bias


def _gemv_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _one_row(x):
        return nn.Linear.forward(self, x)
    return gemv(x, self.weight, self.bias)


_FUSED = "_lmforge_fused"  # on a module: (key, the fused product as a callable, output sizes)
FUSIBLE = {"Attention": ("q_proj", "k_proj", "v_proj"), "MLP": ("gate", "up")}  # siblings that read one input


def _mkldnn_product(packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    return lambda x: _linear(x, packed, bias, out_features)


def _cat_bias(linears: list[nn.Module]) -> torch.Tensor | None:
    return None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])


def _fuse(parent: nn.Module, linears: list[nn.Module], batch_hint: int) -> None:
    plain = type(linears[0]) is nn.Linear
    weights = [m.weight if plain else m.qweight for m in linears]
    key = tuple((w.data_ptr(), w._version) for w in weights)
    cached = getattr(parent, _FUSED, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            if plain:
                packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), batch_hint)
                product = _mkldnn_product(packed, _cat_bias(linears), sum(m.out_features for m in linears))
            else:  # int8 weight-only rows with per-row scales stack as they are
                product = Int8Linear(torch.cat(weights), torch.cat([m.scales for m in linears]), _cat_bias(linears))
        setattr(parent, _FUSED, (key, product, [m.out_features for m in linears]))


def fused_outputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The outputs of `module`'s fused sibling projections of x (see FUSIBLE), while a packed_linears context
    has fused them; otherwise None and the module runs its Linear layers one by one."""
    fused = module.__dict__.get("_lmforge_fused_on")
    if fused is None:
        return None
    _, product, sizes = fused
    return product(x).split(sizes, dim=-1)


def _fusible(parent: nn.Module, pack: bool) -> list[nn.Module] | None:
    """The sibling projections of `parent` when they can run as one product: all plain Linear layers (with
    oneDNN), or all int8 weight-only layers; not LoRA-adapted, not held by another open context."""
    names = FUSIBLE.get(type(parent).__name__)
    linears = [getattr(parent, n, None) for n in names or ()]
    kinds = {type(m) for m in linears}
    if not linears or len(kinds) != 1 or not kinds <= ({nn.Linear} if pack else set()) | {Int8Linear}:
        return None
    if any("forward" in m.__dict__ for m in linears) or len({m.bias is None for m in linears}) != 1:
        return None
    if len({(m.weight if type(m) is nn.Linear else m.qweight).dtype for m in linears}) != 1:
        return None
    return linears


@contextmanager
def packed_linears(model: nn.Module, batch_hint: int = 1, enabled: bool = True, gemv: bool = False
                   ) -> Iterator[nn.Module]:
    """Run the model's Linear layers through prepacked oneDNN weights inside the block, with sibling projections
    fused (see the module docstring); int8 weight-only siblings are fused too. gemv=True instead has plain
    Linear layers run compiled single-row products as multiply-and-sum loops (int8 siblings are still fused onto
    their own kernel). A no-op off CPU or with gradients on."""
    p = next(model.parameters(), None)
    if not enabled or torch.is_grad_enabled() or p is None or p.device.type != "cpu":
        yield model
        return
    pack = can_pack(model) and not gemv
    swapped, fused, covered = [], [], set()
    try:
        for parent in model.modules():
            linears = _fusible(parent, pack) if "_lmforge_fused_on" not in parent.__dict__ else None
            if linears is not None:
                _fuse(parent, linears, batch_hint)
                parent._lmforge_fused_on = getattr(parent, _FUSED)
                fused.append(parent)
                covered.update(id(m) for m in linears)
        for m in model.modules():
            # (a module whose forward is already swapped belongs to another open context, e.g. the serving engine
            # while a caller generates on the same model: that context swaps it back)
            if type(m) is not nn.Linear or "forward" in m.__dict__ or id(m) in covered:
                continue
            if gemv:
                m.forward = types.MethodType(_gemv_forward, m)
            elif pack:
                _pack(m, batch_hint)
                m.forward = types.MethodType(_packed_forward, m)
            else:
                continue
            swapped.append(m)
        yield model
    finally:
        for m in swapped:
            del m.forward  # back to the class's forward
        for parent in fused:
            del parent._lmforge_fused_on


def release_packed(model: nn.Module) -> None:
    for m in model.modules():
        for attr in (_ATTR, _FUSED):
            if hasattr(m, attr):
                delattr(m, attr)
