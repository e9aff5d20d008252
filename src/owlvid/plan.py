"""The memory plan: what a checkpoint needs on each device, from config.json alone (no weights read).

`plan_memory(config, max_memory=..., ...)` sizes every module group that is placed whole on one device
(vision tower + projector, token embedding, each decoder layer with its hyper / cross-attention, final norm
+ LM head) and what inference holds beyond the weights, then places the groups on the devices:

* weights: the parameters owlvid loads (the official checkpoints' unused tensors, e.g. SigLIP's last layer and
  pooling head, are never loaded), quantized as owlvid.quantize does (decoder projections, the embedding in
  int8, an untied LM head in the mode; never the vision tower or the cross-attention projections);
* held while serving ("cache"): the text KV cache of `max_batch` decoding rows plus one request being
  prefilled, `max_model_len` tokens each; mPLUG-Owl3's visual K/V of `max_frames` frames per hyper layer for
  as many rows (Slow-Fast's slow-token K/V live only during one prefill); the visual LRU cache
  (`owlvid.load(cache_bytes=...)`, on the vision tower's device);
* transient working memory ("peak", not added across the groups of a device: they run one after another):
  the vision tower's activations for one call plus the projected features of all frames (twice: the chunks
  and their concatenation), the hyper layers' visual K/V projection, a whole-prompt prefill through one
  decoder layer (MLP activations), a quantized weight dequantized for a prefill GEMM, the logits.

`auto` fills the devices in the order given (the vision tower first, then embedding, layers, head) and leaves
the rest to `cpu` when it is listed; `balanced` gives the GPUs equal loads (the smallest cap under which the
in-order fill still places everything). A plan that does not fit raises a one-line InputError naming what
would (int8/int4, fewer frames, one more GPU). Not counted: the CUDA context and allocator slack (max_memory
is what owlvid's tensors may take; `owlvid plan` leaves 1 GiB of each detected GPU for them).
benchmarks/plan_check.py compares the estimates with the peak RSS of real-shape 1B/2B models on the CPU
(measured within 5%: weights +3.6% / +1.7%, whole-request peak +1.6% / +1.8%; Slow-Fast's ConvNeXt tower
alone, 8 frames: weights +2.3%, encoding peak +4.1%).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InputError
from .plan_shape import ModelShape, model_shape

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_CANONICAL = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
INT4_GROUP_SIZES = (128, 64, 32)  # as owlvid.quantize (kept here so that planning never imports torch)
CPU_VISION_CHUNK_BYTES = 16 << 20  # as models/owl3/model.py: crops per CPU vision call
FUSED_PREFILL_ROWS = 128  # as models/owl3/language.py: query rows per fused-attention call
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Settings:
    dtype: str = "bfloat16"
    quantize: str | None = None
    max_frames: int = 16
    max_batch: int = 8
    max_model_len: int = 4096
    visual_cache_bytes: int = 0


@dataclass(frozen=True)
class Group:
    """Modules placed whole on one device, with what they hold there."""

    name: str
    weights: int
    cache: int
    peak: dict[str, int]  # by device kind ("cuda" / "cpu"): working memory at this group's busiest moment
    label: str


def _linear_bytes(n: int, k: int, b: int, mode: str | None) -> int:
    """One weight [n, k] as owlvid.quantize stores it (int8: per-row scale and zero point)."""
    if mode == "int8":
        return n * k + 5 * n
    if mode == "int4":
        group = next((g for g in INT4_GROUP_SIZES if k % g == 0), INT4_GROUP_SIZES[-1])
        kp, np_ = -(-k // group) * group, -(-n // 16) * 16
        return np_ * kp // 2 + (kp // group) * np_ * 2 * b
    return n * k * b


def module_groups(s: ModelShape, st: Settings) -> list[Group]:
    """The groups in placement order: vision, embedding, decoder layers, head."""
    b, q = DTYPE_BYTES[st.dtype], st.quantize
    h, i, kvd, f = s.hidden, s.intermediate, s.kv_dim, st.max_frames
    rows = st.max_batch + 1  # the decoding batch plus one request being prefilled
    cpu_chunk = max(1, CPU_VISION_CHUNK_BYTES // (s.visual_tokens * s.vision_width * b)) if s.vision_width else f
    per_call = {"cuda": min(f, s.vision_batch), "cpu": min(f, s.vision_batch, cpu_chunk)}
    embeds = f * s.vision_out_per_frame * b
    vision = Group("vision", (s.vision_params + s.projector_params) * b,
                   st.visual_cache_bytes if s.family == "owl3" else 0,
                   {k: n * s.vision_act_per_frame * b + 2 * embeds for k, n in per_call.items()},
                   "vision tower + projector")
    logits = st.max_batch * s.vocab * (b + 4)
    embed_bytes = s.vocab * h + 5 * s.vocab if q else s.vocab * h * b
    embed = Group("llm.embed_tokens", embed_bytes, 0, {"cuda": logits if s.tied else 0, "cpu": logits if s.tied
                                                                                                else 0},
                  "embedding" + (" (+ tied LM head)" if s.tied else ""))
    proj = (_linear_bytes(h, h, b, q) * 2 + _linear_bytes(kvd, h, b, q) * 2 + 2 * _linear_bytes(i, h, b, q)
            + _linear_bytes(h, i, b, q))
    plain_layer = proj + (h + 2 * kvd) * b + 2 * h * b  # + q/k/v biases and the two RMSNorms
    t = st.max_model_len
    prefill = t * (3 * i + 6 * h) * b + (i * h * b if q else 0)
    groups = [vision, embed]
    for n in range(s.layers):
        weights, cache, peak = plain_layer, rows * t * 2 * kvd * b, prefill
        if n in s.special_layers:
            weights += s.special_params * b
            tokens = f * s.visual_tokens
            # owl3 keeps every row's visual K/V; Slow-Fast's live during one prefill only
            cache += (rows if s.family == "owl3" else 1) * tokens * 2 * kvd * b
            # projecting them: the features (copied here), their RMSNorm, K/V, the float32 MI-RoPE of K
            peak = max(peak, tokens * (2 * h * b + 2 * kvd * b + 8 * s.head_dim + 16 * kvd)
                       + (FUSED_PREFILL_ROWS * s.heads // s.kv_heads * (tokens + t) if s.variant == "fused" else 0))
        groups.append(Group(f"llm.layers.{n}", weights, cache, {"cuda": peak, "cpu": peak},
                            "hyper layer" if n in s.special_layers and s.family == "owl3" else "layer"))
    head = 0 if s.tied else _linear_bytes(s.vocab, h, b, q)
    groups.append(Group("lm_head", head + h * b, 0, {"cuda": 0 if s.tied else logits, "cpu": 0 if s.tied else logits},
                        "final norm" + ("" if s.tied else " + LM head")))
    return groups


def _kind(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def need(groups: list[Group], device: str) -> int:
    """What these groups hold on one device at its busiest: everything kept, plus the largest working set."""
    return sum(g.weights + g.cache for g in groups) + max((g.peak[_kind(device)] for g in groups), default=0)


def _fill(groups: list[Group], devices: list[str], caps: list[int]) -> list[list[Group]] | None:
    """Groups in order onto the devices in order, moving on when the next group would pass the cap."""
    out: list[list[Group]] = [[] for _ in devices]
    d = 0
    for g in groups:
        while d < len(devices) and need(out[d] + [g], devices[d]) > caps[d]:
            d += 1
        if d == len(devices):
            return None
        out[d].append(g)
    return out


def _explicit(groups: list[Group], device_map: dict[str, str], devices: list[str]) -> list[list[Group]]:
    out: list[list[Group]] = [[] for _ in devices]
    for g in groups:
        names = [g.name] + {"vision": ["projector"], "lm_head": ["llm.norm"]}.get(g.name, [])
        keys = [k for k in device_map if any(k == "" or n == k or n.startswith(k + ".") for n in names)]
        if not keys:
            raise InputError(f"device_map places no module prefix over {g.name!r} (give e.g. {{'': 'cuda:0'}})")
        device = device_map[max(keys, key=len)]
        if device not in devices:
            raise InputError(f"device_map puts {g.name!r} on {device!r}, which max_memory does not list")
        out[devices.index(device)].append(g)
    return out


def place(groups: list[Group], max_memory: dict[str, int], device_map: str | dict[str, str] = "auto"
          ) -> list[list[Group]] | None:
    """Groups per device (in max_memory's order), or None when they do not fit."""
    devices, budgets = list(max_memory), list(max_memory.values())
    if isinstance(device_map, dict):
        out = _explicit(groups, device_map, devices)
        return out if all(need(o, d) <= c for o, d, c in zip(out, devices, budgets)) else None
    if device_map not in ("auto", "balanced"):
        raise InputError(f"device_map must be 'auto', 'balanced' or a {{module prefix: device}} dict, not "
                         f"{device_map!r}")
    best = _fill(groups, devices, budgets)
    gpus = [n for n, d in enumerate(devices) if d != "cpu"]
    if device_map == "auto" or best is None or len(gpus) < 2 or any(best[n] for n, d in enumerate(devices)
                                                                     if d == "cpu"):
        return best
    lo, hi = 0, max(budgets[n] for n in gpus)  # the smallest per-GPU cap that still places everything
    while lo < hi:
        mid = (lo + hi) // 2
        caps = [min(c, mid) if n in gpus else 0 for n, c in enumerate(budgets)]
        if _fill(groups, devices, caps) is None:
            lo = mid + 1
        else:
            hi = mid
    return _fill(groups, devices, [min(c, lo) if n in gpus else 0 for n, c in enumerate(budgets)])


@dataclass
class DevicePlan:
    device: str
    budget: int
    groups: list[Group]

    @property
    def weights(self) -> int:
        return sum(g.weights for g in self.groups)

    @property
    def cache(self) -> int:
        return sum(g.cache for g in self.groups)

    @property
    def peak(self) -> int:
        return need(self.groups, self.device) - self.weights - self.cache

    @property
    def headroom(self) -> int:
        return self.budget - need(self.groups, self.device)


@dataclass
class MemoryPlan:
    shape: ModelShape
    settings: Settings
    device_map: str | dict
    groups: list[Group]
    devices: list[DevicePlan] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(g.weights for g in self.groups)

    @property
    def kv_per_token(self) -> int:
        """Text K/V bytes per token, all layers."""
        return self.shape.layers * 2 * self.shape.kv_dim * DTYPE_BYTES[self.settings.dtype]

    @property
    def visual_kv_per_frame(self) -> int:
        """Visual K/V bytes per frame, all hyper / hybrid layers (one request)."""
        s = self.shape
        return len(s.special_layers) * s.visual_tokens * 2 * s.kv_dim * DTYPE_BYTES[self.settings.dtype]

    @property
    def vision_peak(self) -> dict[str, int]:
        return self.groups[0].peak

    def device_of(self) -> dict[str, str]:
        """Module prefix -> device: the device_map `owlvid.load` would use."""
        return {g.name: d.device for d in self.devices for g in d.groups}


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def plan_memory(config: dict, *, max_memory: dict[str, int], device_map: str | dict[str, str] = "auto",
                dtype: str = "bfloat16", quantize: str | None = None, max_frames: int | None = None,
                max_batch: int = 8, max_model_len: int = 4096, visual_cache_bytes: int | None = None,
                shapes: dict[str, tuple[int, ...]] | None = None, _suggest: bool = True) -> MemoryPlan:
    """The memory plan of a checkpoint (its config.json as a dict) on these devices (max_memory: device ->
    bytes, GPUs in order, `cpu` last if offloading is allowed). Raises a one-line InputError when it cannot
    fit, naming what would."""
    if dtype not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    if quantize not in (None, "int8", "int4"):
        raise InputError(f"quantize must be int8 or int4 (or none), got {quantize!r}")
    if not max_memory:
        raise InputError("max_memory lists no device")
    shape = model_shape(config, shapes)
    if visual_cache_bytes is None:
        visual_cache_bytes = 2 * GiB if shape.family == "owl3" else 0  # owlvid.load's default cache_bytes
    for name, value in (("max_frames", max_frames), ("max_batch", max_batch), ("max_model_len", max_model_len)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    st = Settings(_CANONICAL.get(dtype, dtype), quantize, max_frames or shape.default_frames, max_batch,
                  max_model_len, visual_cache_bytes)
    groups = module_groups(shape, st)
    placed = place(groups, max_memory, device_map)
    if placed is None:
        if not _suggest:
            raise InputError("does not fit")
        raise InputError(_refusal(config, shape, st, groups, max_memory, device_map, shapes))
    plan = MemoryPlan(shape, st, device_map, groups)
    plan.devices = [DevicePlan(d, max_memory[d], g) for d, g in zip(max_memory, placed)]
    return plan


def _refusal(config: dict, shape: ModelShape, st: Settings, groups: list[Group], max_memory: dict[str, int],
             device_map: str | dict, shapes: dict | None) -> str:
    total = sum(g.weights + g.cache for g in groups) + max(g.peak["cuda"] for g in groups)
    budget = sum(max_memory.values())
    where = ", ".join(f"{d}={gib(v)}GiB" for d, v in max_memory.items())
    biggest = max(need([g], d) for g in groups for d in max_memory)
    weights = sum(g.weights for g in groups)
    head = (f"{shape.family} {shape.variant} ({st.quantize or st.dtype}, {st.max_frames} frames, batch "
            f"{st.max_batch}, {st.max_model_len} tokens) needs {gib(total)} GiB (weights {gib(weights)} GiB, "
            f"one group up to {gib(biggest)} GiB) and does not fit on {where}")

    def fits(**change: object) -> bool:
        kwargs = dict(dtype=st.dtype, quantize=st.quantize, max_frames=st.max_frames, max_batch=st.max_batch,
                      max_model_len=st.max_model_len, visual_cache_bytes=st.visual_cache_bytes)
        memory = change.pop("max_memory", max_memory)
        kwargs.update(change)
        try:
            plan_memory(config, max_memory=memory, device_map=device_map if isinstance(device_map, str) else "auto",
                        shapes=shapes, _suggest=False, **kwargs)
        except InputError:
            return False
        return True

    ideas: list[str] = []
    for mode in {None: ("int8", "int4"), "int8": ("int4",), "int4": ()}[st.quantize]:
        if fits(quantize=mode):
            ideas.append(f"--quantize {mode}")
            break
    if st.max_frames > 1 and fits(max_frames=1):
        lo, hi = 1, st.max_frames - 1  # the most frames that fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(max_frames=mid) else (lo, mid - 1)
        ideas.append(f"--max-frames {lo}")
    if st.max_batch > 1 and fits(max_batch=1):
        ideas.append("--max-batch 1")
    gpus = [d for d in max_memory if d != "cpu"]
    for extra in range(1, 8) if gpus else ():  # the fewest GPUs like the last one that would hold it
        more = {d: v for d, v in max_memory.items() if d != "cpu"}
        more.update({f"cuda:{99 + n}": max_memory[gpus[-1]] for n in range(extra)})
        more.update({"cpu": max_memory["cpu"]} if "cpu" in max_memory else {})
        if fits(max_memory=more):
            ideas.append(f"{'one' if extra == 1 else extra} more {gib(max_memory[gpus[-1]])} GiB "
                         f"GPU{'s' if extra > 1 else ''}")
            break
    if not ideas:
        return f"{head}; it needs more memory than {gib(budget)} GiB allows even quantized with fewer frames"
    return f"{head}: it would fit with {', or '.join(ideas)}"


def parse_size(text: str) -> int:
    """'14GiB', '16GB', '512MiB', '1.5g' or plain bytes -> bytes (an InputError otherwise)."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"not a memory size: {text!r} (e.g. 14GiB, 16GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_max_memory(spec: str | dict) -> dict[str, int]:
    """'cuda:0=14GiB,cuda:1=14GiB,cpu=64GiB' (or a dict) -> {device: bytes}, GPUs in order, cpu last. A bare
    index means that CUDA device, `cuda` means cuda:0."""
    items = spec.items() if isinstance(spec, dict) else (
        part.split("=", 1) if "=" in part else (part, None) for part in str(spec).split(",") if part.strip())
    out: dict[str, int] = {}
    for key, value in items:
        if value is None:
            raise InputError(f"max_memory entry {key!r} has no size: write DEVICE=SIZE, e.g. cuda:0=14GiB")
        name = str(key).strip().lower()
        name = f"cuda:{name}" if name.isdigit() else "cuda:0" if name == "cuda" else name
        if not (name == "cpu" or re.fullmatch(r"cuda:\d+", name)):
            raise InputError(f"max_memory device {key!r}: use cuda:N, N or cpu")
        if name in out:
            raise InputError(f"max_memory lists {name} twice")
        out[name] = value if isinstance(value, int) else parse_size(value)
    if not out:
        raise InputError("max_memory lists no device")
    cpu = out.pop("cpu", None)
    return {**out, **({"cpu": cpu} if cpu is not None else {})}

