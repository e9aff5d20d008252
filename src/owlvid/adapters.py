"""Reading LoRA adapters as PEFT and ms-swift save them: `adapter_config.json` + `adapter_model.safetensors`.

The tensors are keyed by the official module paths under PEFT's wrapper prefix, e.g.
`base_model.model.language_model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]); the module path goes through the family's checkpoint key map (the one that loads the base weights),
so an adapter lands on exactly the parameter its module's `.weight` would. The update of a module is
`scale * B @ A` with `scale = alpha / r`, or `alpha / sqrt(r)` with `use_rslora` (per-module `r` / `alpha`
from `rank_pattern` / `alpha_pattern`, as PEFT matches them). What owlvid does not implement (DoRA, LoRA biases,
trained biases, embedding LoRA, modules_to_save, ...) is refused with one line, and so is any tensor that
does not land on a linear layer of the model: nothing is silently ignored. See docs/finetunes.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import iter_file
from .errors import CheckpointError, InputError, UnsupportedError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<name>[^.]+))?\.weight$")

# Config fields that change what an adapter computes, and the value under which owlvid computes it exactly.
# (Training-only fields such as lora_dropout, init_lora_weights, loftq/eva/corda configs change nothing here.)
_MUST_BE = {
    "use_dora": (False, "DoRA (use_dora) adapters are not supported: merge it with ms-swift export "
                        "(swift export --merge_lora true) and load the merged folder as a checkpoint"),
    "lora_bias": (False, "LoRA biases (lora_bias true) are not supported"),
    "bias": ("none", "adapters that train biases (bias {!r}) are not supported: train with bias 'none' or merge "
                     "the adapter with ms-swift export"),
    "modules_to_save": (None, "adapters with modules_to_save ({}) are not supported: merge it with ms-swift "
                              "export and load the merged folder as a checkpoint"),
    "layer_replication": (None, "adapters with layer_replication are not supported"),
    "trainable_token_indices": (None, "adapters with trainable_token_indices are not supported"),
    "target_parameters": (None, "adapters with target_parameters are not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
    "use_qalora": (False, "QA-LoRA (use_qalora) adapters are not supported"),
    "arrow_config": (None, "Arrow (arrow_config) adapters are not supported"),
}


@dataclass
class LoraWeights:
    """The low-rank update of one linear layer (owlvid's module name): `scale * b @ a`."""

    module: str
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """The float32 weight update [out, in]."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass
class Adapter:
    """A parsed LoRA adapter: per target module its factors and scale, ready to merge or to serve."""

    name: str
    path: Path
    rank: int
    alpha: float
    rslora: bool
    modules: dict[str, LoraWeights]
    sha256: str
    unused: list[str] = field(default_factory=list)  # tensors on modules the model never runs

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "r": self.rank, "lora_alpha": self.alpha,
                "use_rslora": self.rslora, "modules": len(self.modules), "max_rank": self.max_rank,
                "sha256": self.sha256, "unused_tensors": list(self.unused)}

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.modules.values()), default=0)


def check_lora_modules(lora_modules: object) -> None:
    """`lora_modules` must map distinct adapter names to folders (checked before anything is loaded)."""
    if lora_modules is None:
        return
    if not isinstance(lora_modules, dict):
        raise InputError("lora_modules must be a dict {name: adapter folder}")
    for name in lora_modules:
        if not isinstance(name, str) or not name or name != name.strip():
            raise InputError(f"adapter name {name!r} must be a non-empty string without surrounding spaces")


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a LoRA adapter: it has no {CONFIG_NAME}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def check_config(config: dict, where: Path) -> None:
    """Refuse, with one line, an adapter type or option whose computation owlvid does not implement."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not supported (owlvid serves LoRA adapters)")
    for key, (ok, message) in _MUST_BE.items():
        value = config.get(key)
        if value is not None and value != ok and value not in ([], {}, False):  # null, empty, false: unset
            raise UnsupportedError(f"{where}: " + message.format(value))
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{where}: {CONFIG_NAME} needs a positive number {key!r}, got {value!r}")


def pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_adapter(path: str | Path, model: nn.Module, key_map: Callable[[str], str | None],
                 name: str | None = None) -> Adapter:
    """Parse the adapter folder at `path` against `model` (whose parameters `key_map` names from the official
    checkpoint keys). Every tensor must be a LoRA factor of a linear layer of the model, with matching shapes."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"LoRA adapter {str(path)!r} not found: give the folder holding {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME}")
    config = read_config(folder)
    check_config(config, folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        found = "adapter_model.bin (pickle: convert it to safetensors)" if (folder / "adapter_model.bin").exists() \
            else "none"
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (found: {found})")
    rank, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    params = dict(model.named_parameters())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    official: dict[str, str] = {}
    unused: list[str] = []
    for key, read in iter_file(weights):
        m = _LORA_KEY.match(key)
        if m is None:
            raise UnsupportedError(f"{folder}: tensor {key!r} is not a LoRA factor (lora_A / lora_B weight) and "
                                   "owlvid does not load it (embedding LoRA, trained biases, DoRA magnitudes and "
                                   "modules_to_save are not supported)")
        path_ = m["module"][len(_PREFIX):] if m["module"].startswith(_PREFIX) else m["module"]
        target = key_map(path_ + ".weight")
        if target is None:
            if path_.endswith("lm_head"):
                raise UnsupportedError(f"{folder}: tensor {key!r} adapts the LM head, which this checkpoint ties to "
                                       "the token embeddings: not supported")
            unused.append(key)  # a module the model never runs (e.g. SigLIP's pooling head): no effect
            continue
        weight = params.get(target)
        if weight is None or not target.endswith(".weight") or weight.dim() != 2:
            raise UnsupportedError(f"{folder}: tensor {key!r} targets {path_!r}, which is not a linear layer of "
                                   "this model (wrong base model?)")
        module = target[: -len(".weight")]
        side = factors.setdefault(module, {})
        if m["side"] in side:
            raise CheckpointError(f"{folder}: {path_!r} has two lora_{m['side']} tensors")
        side[m["side"]] = read()
        official[module] = path_
    modules: dict[str, LoraWeights] = {}
    for module, pair in factors.items():
        where = f"{folder}: {official[module]!r}"
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{where} has lora_{next(iter(pair))} but no lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        out_features, in_features = params[module + ".weight"].shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features \
                or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit its "
                                  f"weight [{out_features}, {in_features}] (wrong base model?)")
        r = pattern_value(config.get("rank_pattern"), official[module], rank)
        if a.shape[0] != r:
            raise CheckpointError(f"{where}: lora_A has rank {a.shape[0]} but {CONFIG_NAME} says r={r}")
        a_ = pattern_value(config.get("alpha_pattern"), official[module], alpha)
        scale = a_ / math.sqrt(r) if rslora else a_ / r
        modules[module] = LoraWeights(module, a.float(), b.float(), scale)
    if not modules:
        raise CheckpointError(f"{folder}: {WEIGHTS_NAME} holds no LoRA tensor for this model")
    if unused:
        log.warning("adapter %s: %d tensor(s) on modules the model never runs (as in the official code), e.g. %s",
                    folder, len(unused), unused[0])
    return Adapter(name or folder.name, folder, int(rank), float(alpha), rslora, modules, _file_sha256(weights),
                   unused)
