"""mPLUG-Owl3 (Alibaba, "hyper attention"): config, SigLIP tower, hyper-attention decoder, processor, runtime."""

from .config import Owl3Config
from .model import Owl3
from .processor import IMAGE, VIDEO, Owl3Inputs, Owl3Processor
from .runtime import Owl3Runtime

__all__ = ["Owl3Runtime", "Owl3", "Owl3Config", "Owl3Processor", "Owl3Inputs", "IMAGE", "VIDEO"]
