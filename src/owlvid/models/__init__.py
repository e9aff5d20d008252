"""The model families, found by config.json's `model_type` (the one place that maps a checkpoint to code)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..runtime import ModelRuntime

# model_type -> (module, runtime class); a new family adds one line here
FAMILIES = {
    "mplugowl3": ("owlvid.models.owl3", "Owl3Runtime"),
    "llava_qwen_slow_fast": ("owlvid.models.slowfast", "SlowFastRuntime"),
}


def runtime_class(model_type: str) -> type[ModelRuntime]:
    """The runtime of a checkpoint's `model_type`; a one-line CheckpointError for any other."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"unsupported checkpoint: config.json model_type {model_type!r} (owlvid supports "
                              f"{' and '.join(FAMILIES)})")
    module, name = FAMILIES[model_type]
    return getattr(import_module(module), name)
