"""Slow-Fast video MLLM (SHI-Labs): config, ConvNeXt tower, fast/slow tokens, hybrid decoder, processor, runtime."""

from .model import IMAGE_TOKEN_INDEX, SlowFast, SlowFastConfig
from .processor import IMAGE, SlowFastInputs, SlowFastProcessor
from .runtime import SlowFastRuntime

__all__ = ["SlowFastRuntime", "SlowFast", "SlowFastConfig", "SlowFastProcessor", "SlowFastInputs", "IMAGE",
           "IMAGE_TOKEN_INDEX"]
