"""Inference-time Linear layers with weights prepacked for oneDNN (CPU only).

Decoding multiplies a handful of rows by every weight matrix, once per token. PyTorch's default CPU path for
such skinny products (MKL GEMV / small GEMM on the [out, in] weight) streams weights at well under the memory
bandwidth, and gets worse at batch 8. oneDNN with the weight reordered once into its blocked layout (what
`torch.compile`'s CPU freezing does) reads them several times faster. `packed_linears(model)` puts a
`PackedLinear` (the same weight and bias, plus the reordered copy) in the place of every nn.Linear while the context
is open, and puts the plain layers back when it closes: the model's tree shows what runs (`blocks.0.mlp.down` is a
PackedLinear inside the context), its parameters and state_dict stay the same objects and keys.

Projections that read the same input are fused into one packed matrix: an attention layer's q, k and v, and a
gated MLP's gate and up (plain Linear layers, or int8 weight-only ones from `--quantize int8`). A `FusedLinear`,
set in the module's `fused` slot inside the context, does the one product over the stacked weights, which replaces
three (two) calls, so a decoding step of a 30-block model makes 121 matrix calls
instead of 211, and each call's fixed cost (dispatch, oneDNN primitive lookup, waking the threads, and for int8
converting the input to bfloat16) is paid less often. Attention and MLP use their `fused` slot when it
is set and their own Linear layers otherwise.

The packed and fused layers are kept between contexts in a table beside the model (weakly keyed by the plain
module, checked against the weight's storage and version, so a weight that changes is repacked), which costs one
extra copy of the Linear weights in memory (for int8, of the fused projections); `release_packed(model)` frees
them. Results match the plain path to float rounding (about 1e-6
relative).

Compiled decoding of a single sequence (`packed_linears(..., gemv=True)`, what `generate(compile=True)` uses at
batch 1) takes a third way. Each product is then one row times a matrix, and written as an elementwise multiply
and a sum over the inputs, `(W * x).sum(-1)`, inductor turns it into one vectorised loop that streams the
weights at the speed of a plain `sum` over memory, where PyTorch's own GEMV kernels (MKL, or oneDNN prepacked)
reach about 55-70% of it on the CPUs measured here. Nothing is copied or fused for these (a `GemvLinear` shares
the plain layer's weight): sibling projections become separate loops over the same input (inductor runs them in
one pass). Int8 weight-only layers keep their kernel (inductor's loop loads int8 weights eight at a time through a
slow partial-vector path, measured 1.5 GB/s).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.nn import invariant
from lmforge.nn.init import aligned
from lmforge.nn.quant import Int4Linear, Int8Linear, int8_linear


def can_pack(model: nn.Module) -> bool:
    """oneDNN can take the model's Linear layers: on a CPU, fp32 weights, or bf16 ones where oneDNN has a bf16
    path on this CPU (AVX-512 and up; elsewhere the plain layers run)."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return p.dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
    def packed_linear(
        x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @packed_linear.register_fake
    def _(x, packed, bias, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    return packed_linear


_OPAQUE = _opaque_op()


def _key(*weights: torch.Tensor) -> tuple:
    return tuple((w.data_ptr(), w._version, w.dtype) for w in weights)


class PackedLinear(nn.Module):
    """An nn.Linear for inference with its weight reordered once into oneDNN's blocked layout. It holds the plain
    layer's own weight and bias (so parameters and state_dict are unchanged); the reordered copy is a plain
    attribute (derived data in oneDNN's opaque layout: never saved, never moved)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.key = _key(linear.weight)
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(aligned(linear.weight.detach()), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant.rows(
            "onednn", lambda t: _linear(t, self.packed, self.bias, self.out_features), x, self.out_features
        )


class RowLinear(nn.Module):
    """An nn.Linear (its own weight and bias) whose inference products run under a batch-invariant row plan
    (lmforge.nn.invariant): what stands in for a plain layer while decoding where nothing is packed (a GPU,
    autocast, bf16 without oneDNN's bf16 path, pack_weights=False)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.key = _key(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return invariant.rows(f"linear {dtype}", lambda t: F.linear(t, self.weight, self.bias), x, self.out_features)


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


class GemvLinear(nn.Module):
    """An nn.Linear (its own weight and bias) whose product with one row, inside a compiled step, is written as
    multiply-and-sum (`gemv`); any other input takes the ordinary product."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.key = _key(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.weight, self.bias) if _one_row(x) else F.linear(x, self.weight, self.bias)


FUSIBLE = {"Attention": ("q_proj", "k_proj", "v_proj"), "MLP": ("gate", "up")}  # siblings that read one input


def _weights(linears: list[nn.Module]) -> list[torch.Tensor]:
    """The stored weights of sibling projections: plain Linear weights, or int8 / int4 layers' codes."""
    return [m.weight if type(m) is nn.Linear else m.qweight for m in linears]


def _cat_bias(linears: list[nn.Module]) -> torch.Tensor | None:
    return None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])


class FusedLinear(nn.Module):
    """Sibling projections that read the same input (an attention layer's q, k, v; a gated MLP's gate, up) as one
    product over their stacked weights, for inference: forward returns one output per sibling. Plain siblings
    stack into one oneDNN-packed matrix, int8 weight-only ones into one int8 matrix with their row scales, int4
    ones into one Int4Linear (codes, group scales and zero points stacked by rows, the same group size). The
    stacked copies are plain attributes: the module has no parameters or buffers, so it adds nothing to a
    state_dict while it sits in its parent's `fused` slot."""

    def __init__(self, linears: list[nn.Module], batch_hint: int = 1) -> None:
        super().__init__()
        self.plain = type(linears[0]) is nn.Linear
        self.int4: tuple[Int4Linear, ...] = ()  # in a tuple: a plain attribute, not a submodule with buffers
        weights = _weights(linears)
        self.key = _key(*weights)
        self.sizes = [m.out_features for m in linears]
        self.bias = _cat_bias(linears)
        with torch.no_grad():
            if self.plain:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(
                    torch.cat([w.detach() for w in weights]), batch_hint
                )
            elif type(linears[0]) is Int4Linear:
                self.int4 = (
                    Int4Linear(
                        torch.cat(weights),
                        torch.cat([m.scales for m in linears]),
                        torch.cat([m.zeros for m in linears]),
                        linears[0].group_size,
                        self.bias,
                    ),
                )
            else:  # int8 weight-only rows with per-row scales stack as they are
                self.qweight = aligned(torch.cat(weights))
                self.scales = torch.cat([m.scales for m in linears]).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.plain:
            n = sum(self.sizes)
            y = invariant.rows("onednn", lambda t: _linear(t, self.packed, self.bias, n), x, n)
        elif self.int4:
            y = self.int4[0](x)
        else:
            y = int8_linear(x, self.qweight, self.scales, self.bias)
        return y.split(self.sizes, dim=-1)


def _fusible(parent: nn.Module, pack: bool) -> list[nn.Module] | None:
    """The sibling projections of `parent` when they can run as one product: all plain Linear layers (with
    oneDNN), all int8 weight-only layers on the int8 kernel, or all int4 layers of one group size on the int4
    kernel; not LoRA-adapted (another type), not already replaced by another open context."""
    names = FUSIBLE.get(type(parent).__name__)
    if not names or getattr(parent, "fused", None) is not None:
        return None
    linears = [getattr(parent, n, None) for n in names]
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or not kinds <= ({nn.Linear} if pack else set()) | {Int8Linear, Int4Linear}:
        return None
    if Int8Linear in kinds and not all(m.fast for m in linears):
        return None
    if Int4Linear in kinds and (len({m.group_size for m in linears}) != 1 or not all(m.use_kernel for m in linears)):
        return None
    if len({m.bias is None for m in linears}) != 1:
        return None
    if len({w.dtype for w in _weights(linears)}) != 1:
        return None
    return linears


# the packed / fused / gemv layers built for a module, kept between contexts until its weights change
_BUILT: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _built(owner: nn.Module, kind: str, key: tuple, build) -> nn.Module:
    table = _BUILT.setdefault(owner, {})
    layer = table.get(kind)
    if layer is None or layer.key != key:
        layer = table[kind] = build()
    return layer


# what the open contexts have put in: module -> {slot name: [number of open contexts using it, the original]}.
# Several contexts can be open on one model at once, in different threads (the serving engine for its whole life,
# a caller's generate() on the same model meanwhile): a slot is filled by the first and put back by the last, so
# no context pulls a layer from under another one's forward pass.
_OPEN: weakref.WeakKeyDictionary[nn.Module, dict[str, list]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _hold(parent: nn.Module, name: str, held: list) -> bool:
    """Join the open context's layer in parent.name if there is one."""
    entry = _OPEN.get(parent, {}).get(name)
    if entry is None:
        return False
    entry[0] += 1
    held.append((parent, name))
    return True


def _install(parent: nn.Module, name: str, layer: nn.Module, held: list) -> None:
    _OPEN.setdefault(parent, {})[name] = [1, getattr(parent, name)]
    setattr(parent, name, layer)
    held.append((parent, name))


def _let_go(held: list) -> None:
    for parent, name in reversed(held):
        slots = _OPEN[parent]
        entry = slots[name]
        entry[0] -= 1
        if entry[0] == 0:
            setattr(parent, name, entry[1])
            del slots[name]


@contextmanager
def packed_linears(
    model: nn.Module, batch_hint: int = 1, enabled: bool = True, gemv: bool = False
) -> Iterator[nn.Module]:
    """Inside the block the model's Linear layers are PackedLinear ones (prepacked oneDNN weights) and sibling
    projections run as one FusedLinear each (see the module docstring); int8 weight-only siblings are fused too.
    gemv=True instead puts GemvLinear layers in (compiled single-row products as multiply-and-sum loops; int8
    siblings are still fused onto their own kernel). The plain layers are back when the block ends. Off a CPU,
    under autocast (a packed fp32 weight takes no bf16 input) or with enabled=False nothing is packed or fused,
    and while batch invariance is on (lmforge.nn.invariant) the plain layers run as RowLinear ones, under a row
    plan; with gradients on it is a no-op. Safe to open on one model from several threads at once: a context
    opened while another is open on the same model uses the layers that one put in (and keeps them until both
    have closed)."""
    p = next(model.parameters(), None)
    if torch.is_grad_enabled() or p is None:
        yield model
        return
    cpu = p.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    gemv = gemv and cpu and enabled
    pack = cpu and enabled and not gemv and can_pack(model)
    rows = invariant.enabled() and not (gemv or pack)  # plain layers under a batch-invariant row plan
    if not (gemv or pack or rows):
        yield model
        return
    fuse = cpu and enabled
    held: list[tuple[nn.Module, str]] = []
    try:
        with _LOCK:
            fused = []
            for parent in list(model.modules()):
                if _hold(parent, "fused", held):
                    fused.append(parent)
                    continue
                linears = _fusible(parent, pack) if fuse else None
                if linears is not None:
                    _install(
                        parent,
                        "fused",
                        _built(
                            parent, "fused", _key(*_weights(linears)), lambda ls=linears: FusedLinear(ls, batch_hint)
                        ),
                        held,
                    )
                    fused.append(parent)
            covered = {id(getattr(parent, n)) for parent in fused for n in FUSIBLE[type(parent).__name__]}
            for parent in list(model.modules()):
                for name, m in list(parent.named_children()):
                    if _hold(parent, name, held):
                        continue
                    if type(m) is not nn.Linear or id(m) in covered:
                        continue
                    if gemv:
                        layer = _built(m, "gemv", _key(m.weight), lambda m=m: GemvLinear(m))
                    elif rows:
                        layer = _built(m, "rows", _key(m.weight), lambda m=m: RowLinear(m))
                    else:
                        layer = _built(m, "packed", _key(m.weight), lambda m=m: PackedLinear(m, batch_hint))
                    _install(parent, name, layer, held)
        yield model
    finally:
        with _LOCK:
            _let_go(held)


def release_packed(model: nn.Module) -> None:
    """Free the packed and fused copies built for the model's layers (they are rebuilt when next needed)."""
    for m in model.modules():
        _BUILT.pop(m, None)
