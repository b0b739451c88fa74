"""Quantization: weight-only int8 and int4 and dynamic int8 for inference, and int8 / NF4 frozen bases for
quantized-base LoRA (QLoRA).

Each Linear weight row (one output feature) is stored as int8 with one float scale: w ~= q * scale, q in
[-127, 127], scale = max|w_row| / 127. Decoding reads a quarter of the fp32 bytes. On CPU the product runs in
PyTorch's int8-weight kernel (`aten._weight_int8pack_mm`, the one gpt-fast uses) with bfloat16 activations
and float accumulation; elsewhere the weight is dequantized on the fly.

int4 (weight-only) stores each group of `group_size` consecutive weights of a row (64 by default) as 4-bit
codes with a scale and a zero point per group: w ~= (q - 8) * scale + zero, q in 0..15 (asymmetric, so a
group's range is used in full). On CPU the product runs in PyTorch's int4 kernel
(`aten._weight_int4pack_mm_for_cpu`, bfloat16 activations) on a copy repacked into its layout at first use.

Dynamic int8 (`int8-dynamic`) keeps the same int8 rows and quantizes the activations too, per row at run time,
so the product itself is int8 x int8 (PyTorch's fbgemm kernel via `torch.ao` dynamic quantization; PyTorch
marks that API as deprecated in favour of torchao, which lmforge does not depend on).

A decoder whose output head is tied to its embedding keeps one int8 matrix for both (`Int8Embedding` and its
`head()`), in every mode: it is often the largest matrix of a small model.

NF4 (the QLoRA paper's 4-bit NormalFloat) stores each block of 64 weights as 4-bit indices into 16 levels
placed at quantiles of a standard normal (pre-trained weights are close to normal), scaled by the block's
absolute maximum: 0.5 byte per weight plus one float per block, about 1/7 of fp32. Unlike the paper we keep the
block scales in fp32 (no double quantization: 0.06 byte per weight more).

A frozen int4 base (`int4` under quantized-base LoRA) uses the same int4 layout in groups of 32. That is the
block of llama.cpp's Q4_1 (w = d * q + m per 32 weights), so a model read from a Q4_1 GGUF, such as the packaged
SmolLM2, is held on its own 4-bit grid again with nothing lost, where NF4 would quantize that grid a second time.
Scales and zero points stay fp32 (0.25 byte per weight on top of the codes' 0.5).

Every quantized layer keeps its codes in 64-byte-aligned memory (`lmforge.nn.init.aligned`, a no-op for a fresh
tensor): codes read from a file may start at any byte, and the int8 kernel crashes on such a weight on CPUs with
AMX. Loaders align what they read already; the layers check again so that codes handed in any other way (a slice,
a tensor built elsewhere) are safe too.

A frozen quantized base under LoRA is used through `frozen_linear`, whose backward dequantizes the weight
again instead of keeping the dequantized copy alive between forward and backward: that copy would bring the
fp32 memory back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.nn import invariant
from lmforge.nn.init import aligned

MODES = ("int8", "int4", "int8-dynamic")
BASE_MODES = ("int8", "nf4", "int4")  # frozen bases for LoRA
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes PyTorch's CPU int4 kernel takes; others dequantize
BASE_INT4_GROUP = 32  # int4 frozen bases: groups of 32 (llama.cpp Q4_1's blocks, so such a base is kept exactly)


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", aligned(qweight))
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # the bfloat16-activation CPU kernel (inference); off for a frozen LoRA base (see base_int8)
        self.fast = qweight.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")
        self._scales_bf16 = scales.to(torch.bfloat16)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> Int8Linear:
        w = m.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if m.bias is None else m.bias.detach().clone()
        return cls(q.contiguous(), scales, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and not (torch.is_grad_enabled() and x.requires_grad):
            return int8_linear(x, self.qweight, self._scales_bf16, self.bias)
        # in the input's dtype, rows dequantized in slices (inference: under a batch-invariant row plan)
        y = invariant.rows(
            "int8 rows", lambda t: frozen_linear(t, self), x.reshape(-1, self.in_features), self.out_features
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales_bf16: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., K] times an int8 weight [N, K] with per-row bfloat16 scales, on the CPU's weight-only int8 kernel
    (the activations in bfloat16), under a batch-invariant row plan (lmforge.nn.invariant); the result in x's
    dtype."""

    def product(t: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(aligned(t.to(torch.bfloat16).contiguous()), qweight, scales_bf16)

    y = invariant.rows("int8", product, x.reshape(-1, x.size(-1)), qweight.size(0)).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], qweight.size(0))


class Int4Linear(nn.Module):
    """Weight-only int4 with group-wise scales and zero points (see the module notes); a frozen LoRA base too."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", aligned(qweight))  # uint8 [out, in / 2]: two 4-bit codes per byte
        self.register_buffer("scales", scales)  # [out, in / group_size]
        self.register_buffer("zeros", zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernel: tuple | None = None  # (packed weight, scales-and-zeros) in the CPU kernel's layout
        # the CPU kernel (bfloat16 activations, an extra packed copy) for inference; a frozen LoRA base computes
        # in the input's dtype from the dequantized weight instead, as NF4 does
        self.use_kernel = True

    @classmethod
    def from_linear(cls, m: nn.Linear, group_size: int = 64) -> Int4Linear:
        N, K = m.weight.shape
        if K % group_size or group_size % 2:
            raise ConfigError(
                f"int4 group size {group_size} does not divide a layer's {K} inputs; choose one that "
                "does (e.g. 32 or 64)"
            )
        w = m.weight.detach().float().view(N, K // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((w - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).view(N, K)
        bias = None if m.bias is None else m.bias.detach().clone()
        return cls.from_grid(q, scales, lo, group_size, bias)

    @classmethod
    def from_grid(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        low: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> Int4Linear:
        """The layer whose weight is w = scales * codes + low per group (codes [out, in] in 0..15, scales and
        low [out, in / group_size]): a grid chosen here (from_linear) or stored in a file (a GGUF's Q4 blocks)."""
        packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
        return cls(packed.contiguous(), scales.float(), (low + 8 * scales).float(), group_size, bias)

    def codes(self) -> torch.Tensor:
        return torch.stack([self.qweight >> 4, self.qweight & 15], dim=-1).view(self.out_features, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.codes().view(self.out_features, -1, self.group_size).float()
        low = (self.zeros - 8 * self.scales)[..., None]  # w = (q - 8) * scale + zero, in one fused pass
        return torch.addcmul(low, q, self.scales[..., None]).view(self.out_features, -1).to(dtype)

    def _packed(self) -> tuple | None:
        if not self.use_kernel:
            return None
        if self._kernel is None and self.group_size not in INT4_KERNEL_GROUPS:
            self._kernel = ()
        if (
            self._kernel is None
            and self.qweight.device.type == "cpu"
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        ):
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
                sz = torch.stack([self.scales, self.zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
                self._kernel = (packed, sz)
            except RuntimeError:  # a shape the kernel does not take: dequantize instead
                self._kernel = ()
        return self._kernel or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:  # a frozen base under LoRA: no fp32 copy is kept
            y = frozen_linear(x2, self)
        elif (kernel := self._packed()) is not None:

            def product(t: torch.Tensor) -> torch.Tensor:
                return torch.ops.aten._weight_int4pack_mm_for_cpu(
                    aligned(t.to(torch.bfloat16).contiguous()), kernel[0], self.group_size, kernel[1]
                )

            y = invariant.rows(f"int4 g{self.group_size}", product, x2, self.out_features).to(x.dtype)
        else:
            y = invariant.rows(
                "int4 dequantized", lambda t: F.linear(t, self.dequantize(x.dtype)), x2, self.out_features
            )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def dynamic_int8(m: Int8Linear) -> nn.Module:
    """The int8 rows of `m` as a dynamically quantized Linear (int8 activations, fbgemm), inference only."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():  # torch.ao quantization is deprecated upstream (see the module notes)
        warnings.simplefilter("ignore")
        d = DynamicLinear(m.in_features, m.out_features, bias_=m.bias is not None, dtype=torch.qint8)
        w = torch._make_per_channel_quantized_tensor(
            m.qweight, m.scales.double(), torch.zeros(m.out_features, dtype=torch.long), 0
        )
        d.set_weight_bias(w, None if m.bias is None else m.bias.detach().float())
    return d


def int8_rows(d: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight int8 [out, in], scales [out]) of a dynamically quantized Linear, to save it."""
    w = d.weight()
    return w.int_repr().contiguous(), w.q_per_channel_scales().float()


def _nf4_levels() -> torch.Tensor:
    """16 levels: 0, 8 positive and 7 negative quantiles of N(0, 1), scaled to [-1, 1] (asymmetric so that 0 is
    exact), built the way the QLoRA paper describes."""
    offset = 0.9677083  # the paper's choice: mean of the outermost quantile pairs for 15 and 16 levels
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


NF4_LEVELS = _nf4_levels()


class NF4Linear(nn.Module):
    """A frozen Linear stored as block-wise NF4 (see the module notes); computes in the input's dtype."""

    block = 64

    def __init__(
        self, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.register_buffer("packed", aligned(packed))  # uint8, two 4-bit indices per byte
        self.register_buffer("scales", scales)  # fp32 absmax per block of 64 weights
        self.register_buffer("levels", NF4_LEVELS.clone())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, m: nn.Linear) -> NF4Linear:
        w = m.weight.detach().float().reshape(-1)
        n = w.numel()
        pad = (-n) % cls.block
        w = F.pad(w, (0, pad)).view(-1, cls.block)
        scales = w.abs().amax(dim=1).clamp(min=1e-12)
        idx = torch.empty(w.shape, dtype=torch.uint8)
        for s in range(0, w.size(0), 4096):  # nearest level, in slices to bound the [n, 16] distance matrix
            part = w[s : s + 4096] / scales[s : s + 4096, None]
            idx[s : s + 4096] = (part[..., None] - NF4_LEVELS).abs().argmin(-1).to(torch.uint8)
        idx = idx.view(-1)
        packed = (idx[0::2] << 4) | idx[1::2]
        bias = None if m.bias is None else m.bias.detach().clone()
        return cls(packed.contiguous(), scales, tuple(m.weight.shape), bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = torch.stack([self.packed >> 4, self.packed & 15], dim=-1).view(-1, self.block).long()
        w = self.levels[idx] * self.scales[:, None]
        return w.view(-1)[: self.out_features * self.in_features].view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = frozen_linear(x, self)
        else:
            y = invariant.rows("nf4", lambda t: F.linear(t, self.dequantize(x.dtype)), x, self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """A frozen embedding stored as int8 rows with one scale per token. Under quantized-base LoRA a tied output
    head shares these buffers (an Int8Linear over the same qweight), so the vocabulary matrix, often the largest
    of a small model, is held once at a quarter of its fp32 size."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", aligned(qweight))
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, e: nn.Embedding) -> Int8Embedding:
        w = e.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        return cls(torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales[:, None].to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # in the scales' dtype: the model's (fp32 or bf16)
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids][..., None]

    def head(self) -> Int8Linear:
        return Int8Linear(self.qweight, self.scales, None)


def _rows(module: nn.Module, dtype: torch.dtype, chunk: int):
    """(start, dequantized rows) of a quantized weight, `chunk` output rows at a time for int8 (one piece for
    NF4): a vocabulary-sized matrix is never dequantized whole."""
    if isinstance(module, (Int8Linear, Int8Embedding)) and module.qweight.size(0) > chunk:
        for s in range(0, module.qweight.size(0), chunk):
            yield s, module.qweight[s : s + chunk].to(dtype) * module.scales[s : s + chunk, None].to(dtype)
    else:
        yield 0, module.dequantize(dtype)


class _FrozenLinear(torch.autograd.Function):
    """x @ W^T for a frozen quantized W, dequantized in forward and again in backward (nothing fp32 is kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        parts = [F.linear(x, w) for _, w in _rows(module, x.dtype, 8192)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gx = None
        for s, w in _rows(ctx.module, grad.dtype, 8192):
            part = grad[..., s : s + w.size(0)] @ w
            gx = part if gx is None else gx + part
        return gx, None


def frozen_linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return _FrozenLinear.apply(x, module)


def quantize_linear(m: nn.Linear, mode: str) -> nn.Module:
    if mode not in BASE_MODES:
        raise ConfigError(f"quantized base {mode!r} is not supported; supported: {', '.join(BASE_MODES)}")
    if mode == "int4":
        if m.in_features % BASE_INT4_GROUP:
            raise ConfigError(
                f"an int4 base needs layers whose inputs divide into groups of {BASE_INT4_GROUP}; "
                f"this one has {m.in_features}: use --quant nf4"
            )
        base = Int4Linear.from_linear(m, BASE_INT4_GROUP)
        base.use_kernel = False
        return base
    return NF4Linear.from_linear(m) if mode == "nf4" else base_int8(Int8Linear.from_linear(m))


def base_int8(m: Int8Linear) -> Int8Linear:
    """An int8 layer as a frozen LoRA base: it computes in the input's dtype from dequantized rows, as every
    base does, not in the bfloat16-activation kernel meant for quantized inference."""
    m.fast = False
    return m


# heads that stay in full precision: small, and a classifier's decision is what quality is measured on
KEEP = ("classifier", "qa_head", "nsp_head")


def check_quantizable(model: nn.Module, mode: str, group_size: int = 64) -> None:
    """Refuse, before anything changes, a mode this model's layers cannot take: under int4 the groups must
    divide the inputs of every Linear that would be quantized. The message names the first layer that does
    not fit and a group size that fits them all."""
    import math

    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r} is not supported; supported: {', '.join(MODES)}")
    if mode != "int4":
        return
    if group_size < 2 or group_size % 2:
        raise ConfigError(f"int4 group size must be an even number >= 2, got {group_size}")
    inputs = {
        name: m.in_features
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP
    }
    bad = next(((name, k) for name, k in inputs.items() if k % group_size), None)
    if bad is None:
        return
    common = math.gcd(*inputs.values())
    fits = [g for g in (128, 64, 32, 16, 8, 4, 2) if common % g == 0]
    hint = (
        f"--group-size {fits[0]} divides them all" if fits else "no even group size divides them all; use --mode int8"
    )
    raise ConfigError(f"int4 group size {group_size} does not divide the {bad[1]} inputs of {bad[0]}; {hint}")


def quantize_model(model: nn.Module, mode: str = "int8", group_size: int = 64) -> nn.Module:
    """Quantize a model for inference, in place: every Linear (task heads excepted) in `mode` (int8, int4 or
    int8-dynamic), and a decoder's tied embedding + head or an encoder's word embedding as int8 rows. A mode
    the model cannot take (see `check_quantizable`) is refused before any layer changes."""
    check_quantizable(model, mode, group_size)
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is getattr(
        model.tok_emb, "weight", None
    )
    # an MLM head scores against the word embedding itself, so that one stays in full precision
    embed_int8 = getattr(model.config, "head", None) not in ("mlm", "pretrain")
    if embed_int8 and isinstance(getattr(model, "tok_emb", None), nn.Embedding):
        model.tok_emb = Int8Embedding.from_embedding(model.tok_emb)
        if tied:
            model.lm_head = model.tok_emb.head()

    def convert(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in KEEP:
                if mode == "int4":
                    new = Int4Linear.from_linear(child, group_size)
                else:
                    new = Int8Linear.from_linear(child)
                    if mode == "int8-dynamic":
                        new = dynamic_int8(new)
                setattr(parent, name, new)
            elif not isinstance(child, (Int8Linear, Int4Linear, Int8Embedding)):
                convert(child, f"{prefix}{name}.")

    convert(model, "")
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return model.eval()
