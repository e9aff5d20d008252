"""Slow-Fast video MLLM (SHI-Labs): config, ConvNeXt tower, fast/slow tokens, hybrid decoder, processor, runtime."""

from .config import IMAGE_TOKEN_INDEX, SlowFastConfig
from .model import SlowFast
from .processor import IMAGE, SlowFastInputs, SlowFastProcessor
from .runtime import SlowFastRuntime

__all__ = ["SlowFastRuntime", "SlowFast", "SlowFastConfig", "SlowFastProcessor", "SlowFastInputs", "IMAGE",
           "IMAGE_TOKEN_INDEX"]
