"""Shared test fixtures: the parity fixture root and tiny self-built checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("OWLVID_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()


def fixtures_or_skip(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"parity fixtures not found at {path} (set OWLVID_FIXTURES to the shared fixtures folder)")
    return path


@pytest.fixture(scope="session")
def tiny_owl3_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per mPLUG-Owl3 release family, in the official key layout."""
    from owlvid.testing import make_tiny_owl3

    root = tmp_path_factory.mktemp("tiny-owl3")
    return {rel: make_tiny_owl3(root / rel, rel) for rel in ("240728", "241014", "241101")}


@pytest.fixture(scope="session")
def tiny_owl3_models(tiny_owl3_dirs):
    import owlvid

    return {rel: owlvid.load(d, dtype="float32", device="cpu") for rel, d in tiny_owl3_dirs.items()}
