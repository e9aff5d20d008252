"""The parity fixtures are found in the repository, and CI (OWLVID_REQUIRE_FIXTURES=1) fails without them."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import FIXTURES, REPO


def test_parity_fixtures_ship_with_the_repository():
    copy = REPO / "tests" / "fixtures"
    for part in ("owl3/tiny-240728/model.safetensors", "owl3/tokenizer/tokenizer.json",
                 "slowfast/tiny-slowfast-qwen2-convnext576-s1t4/model.safetensors", "slowfast/summary.json"):
        assert (copy / part).is_file(), part
    if not os.environ.get("OWLVID_FIXTURES"):
        assert FIXTURES == copy.resolve()


def _pytest(tmp_path, require: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OWLVID_FIXTURES": str(tmp_path / "nowhere"), "OWLVID_REQUIRE_FIXTURES": require}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/owl3/test_parity.py::test_debug_states_single_image",
                           "tests/slowfast/test_slowfast_fixtures.py::test_tokenizer_probes"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_fixtures_skip_locally_and_fail_in_ci(tmp_path):
    local = _pytest(tmp_path, "")
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout
    ci = _pytest(tmp_path, "1")
    assert ci.returncode == 1 and "2 error" in ci.stdout, ci.stdout
    assert "OWLVID_REQUIRE_FIXTURES=1" in ci.stdout
