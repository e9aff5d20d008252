"""Weight-only quantization of the language model with torchao (`owlvid.load(..., quantize="int8"|"int4")`).

What is quantized, and why (the measurements are in tests/test_quantize.py and the README):

* every Qwen2 projection of the decoder layers (q/k/v/o, gate/up/down): int8 per output row, or int4 in
  groups of 128 inputs (64 or 32 where the input size is not a multiple of 128, as in tiny test checkpoints);
* the token embedding table: int8 per row in both modes. It is also the LM head of the tied checkpoints
  (mPLUG-Owl3 1B/2B), where it is 27% / 15% of the language model's weights and of the bytes each decoded
  token reads; an untied LM head follows the mode;
* not the cross-attention projections (mPLUG-Owl3's hyper-attention `v_kv_proj`, Slow-Fast's
  `cross_attn_kv_proj` and gates): they run once per request over the visual tokens, never while decoding,
  so quantizing them saves little memory, no decoding time, and adds to the logit error
  (`include_cross_attention=True` quantizes them, for that measurement);
* not the vision tower and projector (the visual cache stores their outputs unchanged).

The kernels are torchao's tensor subclasses. On the CPU, a linear layer takes the fastest path for its row
count (KERNEL_MAX_ROWS, measured): few rows (decoding, short prompts) run the quantized matrix-vector kernels
(int8: torch's `_weight_int8pack_mm`, as torchao's eager path converts the whole weight to the activation
dtype on every call; int4: torchao's `_weight_int4pack_mm_for_cpu`), whose cost grows with the rows; more
rows (prompts) dequantize the layer's weight on the fly into one GEMM in the activation dtype (nothing is
cached, so the memory saving stays). An int8 embedding looks up only the rows it needs (torchao's
dequantizes the whole table per call).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .errors import InputError, UnsupportedError

MODES = ("int8", "int4")
TORCHAO_MIN = (0, 18)  # the release these tensor subclasses were measured with
INSTALL_HINT = "pip install 'owlvid[quant]'"
INT4_GROUP_SIZES = (128, 64, 32)  # what the int4 kernels take, largest (most compact) first
INT8_CHUNK_BYTES = 1 << 20  # rows quantized per torchao call (int8_per_row)
# The one place for the path choice by row count: up to this many rows (of a linear layer's input) the CPU
# quantized kernel, above it the weight dequantized on the fly and one GEMM. Where the paths cross, measured
# with benchmarks/quantize.py --kernels (one 1B decoder layer's seven projections, bf16, 2-core AMD EPYC with
# AVX512-BF16, 2 threads; ms kernel vs dequantized): int8 12 rows 2.8 vs 3.5, 16 rows 3.7 vs 3.5, 32 rows 7.5 vs
# 5.0; int4 64 rows 11.8 vs 13.9, 96 rows 17.3 vs 16.3, 128 rows 22.9 vs 21.5, 512 rows 88 vs 45 (one thread:
# int8 ~11, int4 ~90).
KERNEL_MAX_ROWS = {"int8": 12, "int4": 80}
_QWEN2_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_CROSS_ATTENTION_PROJECTIONS = ("self_attn.v_kv_proj", "self_attn.cross_attn_kv_proj")


def check_mode(mode: str | None) -> str | None:
    """None or one of MODES (an InputError names the choices)."""
    if mode is None or mode in MODES:
        return mode
    raise InputError(f"quantize must be one of {', '.join(MODES)} (or none), got {mode!r}")


def import_torchao(mode: str) -> Any:
    """The torchao module, or an UnsupportedError saying how to install it."""
    # torchao logs a warning per CUDA-only extension it cannot load on a CPU build of torch, and torch one
    # about torchao's use of a deprecated registration: not our user's concern, so both are quiet meanwhile.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError:
        raise UnsupportedError(f"quantize={mode!r} needs torchao: {INSTALL_HINT}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    version = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < TORCHAO_MIN:
        raise UnsupportedError(f"quantize={mode!r} needs torchao >= {'.'.join(map(str, TORCHAO_MIN))} (found "
                               f"{torchao.__version__}): {INSTALL_HINT}")
    return torchao


def check_supported(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with one line, a mode this machine cannot run (before any weight is loaded)."""
    check_mode(mode)
    import_torchao(mode)
    if device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"quantize={mode!r} runs on cpu or cuda, not {device.type}")
    if mode == "int4" and device.type == "cuda":
        if dtype != torch.bfloat16:
            raise UnsupportedError(f"quantize='int4' on CUDA needs dtype bfloat16 (torchao's int4 GPU kernel), "
                                   f"not {str(dtype).replace('torch.', '')}")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise UnsupportedError(f"quantize='int4' on CUDA needs compute capability 8.0 or newer (this GPU: "
                                   f"{major}.{minor})")
    if mode == "int4" and device.type == "cpu" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise UnsupportedError(f"quantize='int4' on the CPU needs torch >= 2.6 (found {torch.__version__})")
    if mode == "int4" and dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UnsupportedError(f"quantize='int4' does not take dtype {dtype}")


@dataclass
class QuantizationReport:
    mode: str
    quantized: list[str]  # module names, in model order
    bytes_before: int  # the language model's weights (decoder, embeddings, LM head)
    bytes_after: int


def _targets(model: nn.Module, include_cross_attention: bool = False) -> list[str]:
    """Parameter names of the weights to quantize, in model order (the embedding last)."""
    suffixes = _QWEN2_PROJECTIONS + (_CROSS_ATTENTION_PROJECTIONS if include_cross_attention else ())
    names = [f"llm.layers.{name}.weight" for name, module in model.llm.layers.named_modules()
             if isinstance(module, nn.Linear) and name.split(".", 1)[-1] in suffixes]
    if model.lm_head is not None:
        names.append("lm_head.weight")
    return names + ["llm.embed_tokens.weight"]


def _quantize_param(name: str, weight: torch.Tensor, mode: str) -> torch.Tensor:
    if name == "llm.embed_tokens.weight":  # int8 per row in both modes (see the module docstring)
        return int8_per_row(weight)
    return quantize_weight(weight, mode)


def int8_per_row(weight: torch.Tensor) -> Any:
    """torchao's per-row int8 Int8Tensor of `weight`, computed INT8_CHUNK_BYTES of rows at a time into storage
    allocated once: the same tensor as one `Int8Tensor.from_hp` call (rows are independent), without its
    float32 temporaries of the whole weight (5 GB for a 7B embedding table)."""
    from torchao.quantization import Int8Tensor

    n, k = weight.shape
    step = max(1, INT8_CHUNK_BYTES // max(1, k * weight.element_size()))
    first = Int8Tensor.from_hp(weight[:step], granularity=_per_row())
    if step >= n:
        return first
    parts = {"qdata": first.qdata, "scale": first.scale, "zero_point": first.zero_point}
    full = {key: None if t is None else t.new_empty((n, *t.shape[1:])) for key, t in parts.items()}
    for start in range(0, n, step):
        part = first if start == 0 else Int8Tensor.from_hp(weight[start:start + step], granularity=_per_row())
        for key, t in full.items():
            if t is not None:
                t[start:start + step] = getattr(part, key)
    return Int8Tensor(full["qdata"], full["scale"], list(first.block_size), first.dtype,
                      zero_point=full["zero_point"], act_quant_kwargs=first.act_quant_kwargs)


def _report(model: nn.Module, mode: str, names: list[str], before: int) -> QuantizationReport:
    """Swap the (already int8) embedding table into an Int8Embedding and describe what was done."""
    llm = model.llm
    if not isinstance(llm.embed_tokens, Int8Embedding):
        llm.embed_tokens = Int8Embedding(llm.embed_tokens.weight.detach())
    done = [n.removesuffix(".weight") for n in names]
    return QuantizationReport(mode, done, before, language_model_bytes(model))


def quantize_language_model(model: nn.Module, mode: str, *, include_cross_attention: bool = False
                            ) -> QuantizationReport:
    """Quantize the loaded `model.llm` (and `model.lm_head` when present) in place: see the module docstring.
    Loading does better (`LoadQuantizer`): it never holds the whole model unquantized."""
    llm = model.llm
    check_supported(mode, llm.embed_tokens.weight.device, llm.embed_tokens.weight.dtype)
    register_kernels()
    before = language_model_bytes(model)
    names = _targets(model, include_cross_attention)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            *path, leaf = name.split(".")
            owner = model.get_submodule(".".join(path))
            setattr(owner, leaf, nn.Parameter(_quantize_param(name, params.pop(name).detach(), mode),
                                              requires_grad=False))
    return _report(model, mode, names, before)


class LoadQuantizer:
    """A `transform` for `checkpoint.load_weights`: each weight `quantize_language_model` would quantize is
    quantized as it is read and its unquantized copy dropped at once, so loading peaks at the quantized model
    plus one tensor instead of the whole unquantized model (tests/test_quantize_load.py measures it).
    `keep_rows` first cuts the embedding and LM head to that many rows (Slow-Fast's vocabulary truncation,
    done before quantizing so that the cut rows are never stored). `finish` returns the report."""

    def __init__(self, model: nn.Module, mode: str, dtype: torch.dtype, keep_rows: int | None = None) -> None:
        register_kernels()
        self.model, self.mode, self.keep_rows = model, mode, keep_rows
        self.names = _targets(model)
        self._pending = set(self.names)
        rows = {"llm.embed_tokens.weight", "lm_head.weight"}
        self.bytes_before = sum((min(p.shape[0], keep_rows) * p[0].numel() if keep_rows and n in rows else p.numel())
                                * dtype.itemsize for n, p in language_model_parameters(model))

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.keep_rows is not None and name in ("llm.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[: self.keep_rows]
        if name not in self._pending:
            return tensor
        self._pending.discard(name)
        with torch.no_grad():
            return _quantize_param(name, tensor, self.mode)

    def finish(self) -> QuantizationReport:
        if self._pending:
            raise AssertionError(f"weights never loaded, so not quantized: {sorted(self._pending)[:3]}")
        return _report(self.model, self.mode, self.names, self.bytes_before)


def _per_row() -> Any:
    from torchao.quantization.granularity import PerRow

    return PerRow()


def quantize_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """A torchao int8 (per row) or int4 (per group; padded on the CPU where needed) copy of a 2-D weight."""
    if mode == "int8":
        return int8_per_row(weight)
    n, k = weight.shape
    group = next((g for g in INT4_GROUP_SIZES if k % g == 0), INT4_GROUP_SIZES[-1])
    if weight.device.type != "cpu":  # torchao's GPU layout pads both sizes itself
        from torchao.quantization import Int4TilePackedTo4dTensor

        return Int4TilePackedTo4dTensor.from_hp(weight, [1, group])
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    # The CPU kernel takes input sizes in whole groups and output sizes in multiples of 16: other sizes (tiny
    # test checkpoints only) get zero columns, matched by zero-padded inputs (_int4_linear), and zero rows,
    # which the kernel drops from its output when the tensor keeps the real row count.
    padded = F.pad(weight, (0, -k % group, 0, -n % 16))
    t = Int4OpaqueTensor.from_hp(padded, [1, group])
    if padded.shape[0] != n:
        t = Int4OpaqueTensor(t.qdata, t.scale_and_zero, t.block_size, torch.Size([n, padded.shape[1]]))
    return t


class Int8Embedding(nn.Module):
    """`nn.Embedding` over an int8 table (torchao Int8Tensor, one scale per row): only the looked-up rows
    are dequantized. `weight` is the table itself, so a tied LM head uses it through `layers.linear`."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return (w.qdata[ids].float() * w.scale[ids].float()).to(w.dtype)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 0


def _int8_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type != "cpu" or weight.block_size[-1] != weight.shape[-1] or weight.act_quant_kwargs is not None:
        return F.linear(x, weight, bias)  # GPUs and anything but per-row weight-only int8: torchao's own kernel
    rows = _rows(x)
    x2 = x.reshape(rows, x.shape[-1])
    scale = weight.scale.reshape(-1).to(x.dtype)
    if rows <= KERNEL_MAX_ROWS["int8"]:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight.qdata, scale)
    else:
        y = int8_dequantized_linear(x2, weight.qdata, scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_dequantized_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (qdata * scale).T as one GEMM: int8 -> the activation dtype is exact, and the row scales apply to
    the output's columns (fewer elements than the weight's whenever there are fewer rows than inputs)."""
    return F.linear(x, qdata.to(x.dtype)) * scale


def _int4_linear(x: torch.Tensor, weight: Any, bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[-1] != weight.shape[-1]:  # a zero-padded weight (see quantize_weight)
        x = F.pad(x, (0, weight.shape[-1] - x.shape[-1]))
    if (x.device.type != "cpu" or _rows(x) <= KERNEL_MAX_ROWS["int4"] or not hasattr(weight, "scale_and_zero")
            or weight.act_mapping_type is not None or int4_pack_block() is None):
        return F.linear(x, weight, bias)
    w_t = int4_dequantize_t(weight)[:, : weight.shape[0]].to(x.dtype)
    y = torch.matmul(x, w_t)
    return y + bias if bias is not None else y


@functools.cache
def int4_pack_block() -> int | None:
    """How this torch lays out CPU int4 weights (`_convert_weight_to_int4pack_for_cpu`, by its vector ISA):
    blocks of 64 (AVX512) or 32 (AVX2) output rows whose bytes hold row j in the low nibble and row j + block/2
    in the high one, a last partial block (and every block on other ISAs: 0) in row pairs. Found by packing a
    probe, so a layout this code does not know turns the dequantized path off (None) instead of mis-reading."""
    n, k = 80, 4  # a full block of 64 and a partial one, for both known block sizes
    probe = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (64, 32, 0):
        if torch.equal(_unpack_int4(packed, n, k, block).to(torch.int32) + 8, probe.t()):
            return block
    return None


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """int8 values minus 8 ([K, N], transposed: the GEMM reads it as is) of a packed [N, K/2] int4 weight.
    XOR 0x88 then an arithmetic shift sign-extends each nibble: (q ^ 8) as a signed 4-bit number is q - 8."""
    flat = packed.reshape(-1).view(torch.uint8)
    if flat.numel() % 4 == 0:  # the XOR four bytes at a time (4x faster than on bytes)
        flat = (flat.view(torch.int32) ^ -0x77777778).view(torch.uint8)  # 0x88888888 as an int32
    else:
        flat = flat ^ 0x88
    b = flat.view(torch.int8)
    full = n // block * block if block else 0
    parts = []
    if full:
        blk = b[: full * k // 2].view(full // block, k, block // 2)
        both = torch.cat(((blk << 4) >> 4, blk >> 4), dim=-1)  # [blocks, K, block]: low nibbles first
        parts.append(both.permute(1, 0, 2).reshape(k, full))
    if full < n:
        pairs = b[full * k // 2:].view(k, (n - full) // 2)
        parts.append(torch.stack(((pairs << 4) >> 4, pairs >> 4), dim=-1).reshape(k, n - full))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def int4_dequantize_t(weight: Any) -> torch.Tensor:
    """The transposed dequantized weight [K, N (padded)] of a CPU Int4OpaqueTensor, in its scales' dtype:
    (q - 8) * scale + zero per group, computed as the CPU kernel does (float, rounded once)."""
    block = int4_pack_block()
    if block is None:
        raise UnsupportedError("this torch's CPU int4 weight layout is not known")
    sz = weight.scale_and_zero  # [K / group, N, 2]
    groups, n = sz.shape[0], sz.shape[1]
    k = weight.qdata.numel() * 2 // n
    values = _unpack_int4(weight.qdata, n, k, block).view(groups, k // groups, n).to(sz.dtype)
    scale, zero = sz[..., 0].contiguous(), sz[..., 1].contiguous()  # strided slices broadcast 6x slower
    return torch.addcmul(zero[:, None], values, scale[:, None]).view(k, n)


def register_kernels() -> None:
    """Route the torchao weight types to their kernels in `layers.linear` (see the module docstring)."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int4TilePackedTo4dTensor, Int8Tensor

    layers.QUANTIZED_LINEAR.update({Int8Tensor: _int8_linear, Int4OpaqueTensor: _int4_linear,
                                    Int4TilePackedTo4dTensor: _int4_linear})


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a quantized tensor subclass counts its inner tensors (data, scales, zeros)."""
    if type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


def language_model_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the language model: decoder, embeddings, LM head (not the vision tower)."""
    return [(n, p) for n, p in model.named_parameters() if n.startswith(("llm.", "lm_head."))]


def language_model_bytes(model: nn.Module) -> int:
    """Bytes of the language model's weights: decoder, embeddings, LM head (not the vision tower)."""
    return sum(tensor_bytes(p) for _, p in language_model_parameters(model))
