"""owlvid: fast inference for cross-attention video and multi-image LLMs (mPLUG-Owl3, Slow-Fast)."""

from .api import DEFAULT_MODEL, Model, load
from .engine import Generation, SamplingParams
from .errors import CheckpointError, InputError, MediaError, OwlvidError, UnsupportedError
from .version import __version__

__all__ = ["load", "Model", "Generation", "SamplingParams", "DEFAULT_MODEL", "OwlvidError", "CheckpointError",
           "InputError", "MediaError", "UnsupportedError", "__version__"]
