"""One model across several devices: the decoder as a list of stages (a device and a range of layers).

The placement is the memory plan's (`owlvid.plan`: `auto`, `balanced` or a {module prefix: device} dict, the
same numbers as `owlvid plan`); this module turns it into `Stages`, which `layers.Qwen2Decoder` runs when it
is set. Every module group the plan places (vision tower + projector, embedding, one decoder layer with its
hyper / cross-attention, final norm + LM head) lives whole on one device, and so do the K/V a layer keeps
(its text cache rows, its visual K/V): the caches and visual memories allocate each layer's tensors on that
layer's device. Per step, the hidden states move once per stage boundary (counted in `transfers`); the
step's small tensors (RoPE rows, masks, LoRA rows) are moved once per device (`AttentionInputs.on`).

With a tied LM head (the embedding's weight) the final norm runs beside the embedding: the logits are computed
there, so the last stage's hidden states cross once instead of twice. A stage name may also be `cpu:N`: a
second stage on the CPU (no copy happens, but the stage machinery runs and counts as with two GPUs; tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .checkpoint import resolve_device, resolve_dtype
from .errors import InputError, UnsupportedError
from .plan import parse_max_memory, plan_memory

if TYPE_CHECKING:
    from .layers import AttentionInputs, Qwen2Decoder

CPU = torch.device("cpu")
_NAME = re.compile(r"^(cpu|cuda)(:\d+)?$")


@dataclass(frozen=True)
class Stage:
    """Decoder layers [start, end) on one device (`name` as placed, `device` where its tensors live)."""

    name: str
    device: torch.device
    start: int
    end: int


def device_name(device: str | int | torch.device) -> str:
    """'cuda:N', 'cpu' or 'cpu:N' for a device as a user names it (an int is that CUDA device, 'cuda' cuda:0)."""
    text = f"cuda:{device}" if isinstance(device, int) else str(device).strip().lower()
    text = f"cuda:{text}" if text.isdigit() else "cuda:0" if text == "cuda" else text
    if not _NAME.match(text):
        raise InputError(f"device_map device {device!r}: use cuda:N, N or cpu")
    return text


def physical(name: str) -> torch.device:
    """Where a stage's tensors live: `cpu:N` stages are all on the CPU."""
    device = torch.device(name)
    return CPU if device.type == "cpu" else device


def group_of(param: str) -> str:
    """The memory plan's group of a parameter name (owlvid's module names, both families)."""
    if param.startswith("llm.layers."):
        return ".".join(param.split(".")[:3])
    if param.startswith("llm.embed_tokens."):
        return "llm.embed_tokens"
    if param.startswith(("llm.norm.", "lm_head.")):
        return "lm_head"
    return "vision"  # the vision tower and projector (vision / projector, vision_tower / mm_projector)


class Stages:
    """A split decoder: `stages` in layer order, the vision side, embedding and head (final norm + LM head)
    devices, and `transfers`, the hidden-state moves across stage boundaries so far."""

    def __init__(self, groups: Mapping[str, str], num_layers: int, tied: bool) -> None:
        names = [groups[f"llm.layers.{i}"] for i in range(num_layers)]
        self.vision, self.embed = groups["vision"], groups["llm.embed_tokens"]
        self.head = self.embed if tied else groups["lm_head"]  # see the module docstring
        self.groups = {**groups, "lm_head": self.head}
        self.stages: list[Stage] = []
        for i, name in enumerate(names):
            if self.stages and self.stages[-1].name == name:
                last = self.stages[-1]
                self.stages[-1] = Stage(name, last.device, last.start, i + 1)
            else:
                self.stages.append(Stage(name, physical(name), i, i + 1))
        self.layer_devices = [s.device for s in self.stages for _ in range(s.start, s.end)]
        self.transfers = 0

    @property
    def embed_device(self) -> torch.device:
        """Where the inputs are built: token ids, positions, RoPE rows, media starts."""
        return physical(self.embed)

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys(physical(n) for n in self.groups.values()))

    def check_available(self) -> None:
        """An UnsupportedError naming the first device of the placement this machine does not have."""
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for device in self.devices:
            if device.type == "cuda" and (device.index or 0) >= gpus:
                raise UnsupportedError(f"the device map places modules on {device}, but this machine has "
                                       f"{gpus or 'no'} CUDA GPU{'' if gpus == 1 else 's'}")

    def device_of(self, param: str) -> torch.device:
        """Where a parameter (owlvid name) is loaded."""
        return physical(self.groups[group_of(param)])

    def describe(self) -> list[str]:
        """'module: device' in the order a request runs through them."""
        return ([f"vision: {self.vision}", f"embedding: {self.embed}"]
                + [f"layers {s.start}-{s.end - 1}: {s.name}" for s in self.stages] + [f"head: {self.head}"])

    def _move(self, h: torch.Tensor, at: str, stage: str) -> torch.Tensor:
        if at == stage:
            return h
        self.transfers += 1
        return h.to(physical(stage))

    def run(self, decoder: Qwen2Decoder, h: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """The decoder's layers stage by stage, then its final norm (on the head's device)."""
        at, per_device = self.embed, {}
        for stage in self.stages:
            h, at = self._move(h, at, stage.name), stage.name
            if stage.device not in per_device:
                per_device[stage.device] = inputs.on(stage.device)
            for layer in decoder.layers[stage.start:stage.end]:
                h = layer(h, per_device[stage.device])
        return decoder.norm(self._move(h, at, self.head))


def plan_stages(raw_config: dict, shapes: dict | None, device_map: str | dict, max_memory: str | dict | None, *,
                dtype: torch.dtype, quantize: str | None, cache_bytes: int) -> Stages:
    """The memory plan's placement of this checkpoint as Stages (a one-line InputError when it does not fit).
    A dict `device_map` without `max_memory` is taken as given (every device it names unbounded)."""
    if isinstance(device_map, dict):
        if not device_map:
            raise InputError("device_map is an empty dict: give e.g. {'': 'cuda:0'}")
        wanted: str | dict = {str(k): device_name(v) for k, v in device_map.items()}
        memory = (parse_max_memory(max_memory) if max_memory is not None
                  else {d: 1 << 60 for d in dict.fromkeys(wanted.values())})
    elif device_map in ("auto", "balanced"):
        wanted = device_map
        memory = parse_max_memory(max_memory) if max_memory is not None else detected_max_memory()
    else:
        raise InputError(f"device_map must be 'auto', 'balanced' or a {{module prefix: device}} dict, not "
                         f"{device_map!r}")
    plan = plan_memory(raw_config, max_memory=memory, device_map=wanted, dtype=str(dtype).replace("torch.", ""),
                       quantize=quantize, shapes=shapes, visual_cache_bytes=cache_bytes)
    return Stages(plan.device_of(), plan.shape.layers, plan.shape.tied)


def split_model(raw_config: dict, shapes: dict | None, device_map: str | dict, max_memory: str | dict | None, *,
                dtype: str | torch.dtype, quantize: str | None, cache_bytes: int) -> tuple[Stages, torch.dtype]:
    """`plan_stages` for owlvid.load, with the dtype: "auto" is chosen for the GPUs when the split has any,
    else for the CPU; one every device of the split can run (float16 has no CPU stage)."""
    dt = resolve_dtype(dtype, resolve_device("auto"))
    stages = plan_stages(raw_config, shapes, device_map, max_memory, dtype=dt, quantize=quantize,
                         cache_bytes=cache_bytes)
    if str(dtype) == "auto" and all(d.type == "cpu" for d in stages.devices) and dt != resolve_dtype("auto", CPU):
        dt = resolve_dtype("auto", CPU)
        stages = plan_stages(raw_config, shapes, device_map, max_memory, dtype=dt, quantize=quantize,
                             cache_bytes=cache_bytes)
    stages.check_available()
    for device in stages.devices:
        resolve_dtype(dt, device)
    return stages, dt


GPU_RESERVE = 1 << 30  # left on each detected GPU for the CUDA context, cuBLAS workspaces, allocator slack


def detected_max_memory() -> dict[str, int]:
    """Every visible GPU less GPU_RESERVE, then the available RAM as `cpu`."""
    out: dict[str, int] = {}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        out[f"cuda:{i}"] = max(0, torch.cuda.get_device_properties(i).total_memory - GPU_RESERVE)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    out["cpu"] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if not out:
        raise InputError("cannot tell how much memory this machine has: give max_memory (--max-memory), e.g. cpu=16GiB")
    return out
