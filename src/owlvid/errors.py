"""Exceptions raised for user mistakes: one clear line, never a deep stack trace."""

from __future__ import annotations


class OwlvidError(Exception):
    """Base class of every error owlvid raises on purpose (bad input, bad checkpoint, ...)."""


class CheckpointError(OwlvidError):
    """The checkpoint folder or hub id is missing, incomplete or not a supported model."""


class InputError(OwlvidError):
    """The request itself is invalid: placeholder/media mismatch, prompt too long, ..."""


class MediaError(InputError):
    """An image or video could not be read, decoded or fetched."""


class MediaTimeout(MediaError):
    """Loading or decoding one image or video took longer than the caller's `media_timeout`: that request
    fails, the others go on (the decoding thread is abandoned, not waited for)."""


class UnsupportedError(OwlvidError):
    """A valid request this build or device cannot serve (e.g. float16 on a CPU without support)."""
