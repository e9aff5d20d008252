"""Shared test fixtures: the parity fixture root and tiny self-built checkpoints."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fixture_root() -> Path:
    """OWLVID_FIXTURES if set, else the copy in the repository (tests/fixtures), else ../shared/fixtures."""
    if os.environ.get("OWLVID_FIXTURES"):
        return Path(os.environ["OWLVID_FIXTURES"]).resolve()
    for candidate in (REPO / "tests" / "fixtures", REPO.parent / "shared" / "fixtures"):
        if (candidate / "README.md").exists():
            return candidate.resolve()
    return (REPO / "tests" / "fixtures").resolve()


FIXTURES = _fixture_root()
# CI (.ci/run) sets this: a missing fixture there is a broken checkout, not a reason to skip.
REQUIRE_FIXTURES = os.environ.get("OWLVID_REQUIRE_FIXTURES", "") not in ("", "0")


def fixtures_or_skip(*parts: str) -> Path:
    """The fixture path, or skip (fail when OWLVID_REQUIRE_FIXTURES=1) when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        message = f"parity fixtures not found at {path} (set OWLVID_FIXTURES to the fixtures folder)"
        if REQUIRE_FIXTURES:
            pytest.fail(message + " and OWLVID_REQUIRE_FIXTURES=1", pytrace=False)
        pytest.skip(message)
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


def teacher_forced_logits(runtime, request, tokens: list[int]) -> list:
    """Float32 logits of the prefill and of each decode step fed the given `tokens` (the golden greedy
    ids): lower-precision runs are compared step by step without drifting onto another path."""
    logits, state = runtime.prefill(request)
    steps = [logits.float()]
    for token in tokens[:-1]:
        steps.append(runtime.decode(state, token).float())
    return steps


def assert_close_to_golden_steps(steps: list, gold_tokens: list[int], top_ids, top_values, atol: float,
                                 max_rank: int) -> None:
    """Per step: our logits at the golden top-k ids within `atol`, and the golden token ranked at most
    `max_rank` (0 = our argmax) in our logits."""
    import torch

    assert len(steps) == len(gold_tokens)
    for step, (logits, token) in enumerate(zip(steps, gold_tokens)):
        ids = torch.as_tensor(top_ids[step]).long()
        diff = (logits[ids] - torch.as_tensor(top_values[step])).abs().max().item()
        assert diff < atol, f"step {step}: top-k logits differ by {diff:.4f} (tolerance {atol})"
        rank = int((logits > logits[token]).sum())
        assert rank <= max_rank, f"step {step}: golden token {token} ranked {rank} (at most {max_rank})"


@pytest.fixture()
def silent_host():
    """An http URL of a TCP port that accepts connections (the kernel completes the handshake) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


# The fast lane (`pytest -m "not slow"`, about two minutes on two cores) leaves out what starts processes or
# browsers, runs whole jobs end to end, or walks a matrix; CI runs everything. Listed here, in one place, by
# module (everything in it) or by test name (every parametrisation).
SLOW_MODULES = (
    "tests/web/", "tests/ray/", "tests/server/", "tests/cli/",  # real servers, browsers, Ray, CLI processes
    "tests/eval/test_end_to_end.py", "tests/eval/test_run_safety.py", "tests/batch/test_output_safety.py",
    "tests/batch/test_base_install.py", "tests/test_quantize_load.py", "tests/plan/test_plan_cli.py",
    "tests/test_lora_cli.py",
)
SLOW_TESTS = {
    "test_quality_on_every_fixture_case", "test_cli_quantize_flag", "test_batch_results_equal_individual_results",
    "test_generate_stream_chat_agree", "test_same_video_in_two_batched_conversations",
    "test_cached_decoding_equals_full_recompute", "test_killed_job_resumes_to_the_uninterrupted_answers",
    "test_results_equal_generate_alone_and_failures_are_isolated", "test_requests_join_a_running_batch",
    "test_second_question_reuses_cached_image_features", "test_multi_turn_reuses_the_prefix_kv_cache",
    "test_sampling_is_seeded", "test_batched_decoding_gives_the_tokens_of_each_request_alone",
    "test_mean_greedy_agreement",  # the quantization matrix
    "test_missing_fixtures_skip_locally_and_fail_in_ci",  # nested pytest
    "test_peak_memory_while_loading_is_bounded",  # a subprocess per load
}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        if path.startswith(SLOW_MODULES) or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
