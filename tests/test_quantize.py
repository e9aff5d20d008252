"""Weight-only quantization of the language model (owlvid.quantize, torchao): quality on every fixture case
against the unquantized model, weight bytes, the kernels behind `layers.linear`, the CLI flag and the errors.

The bounds are the measured figures (README "Quantization", float32 on CPU) with some room. The fixture
checkpoints are tiny random models (hidden size 16 / 32) whose logits are nearly tied, so a greedy token
flips at the slightest change: these are worst cases, not the quality on a real checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from owlvid.errors import InputError, UnsupportedError
from owlvid.layers import linear

from .conftest import REQUIRE_FIXTURES, fixtures_or_skip
from .quantize_cases import CASES, checkpoint_folder, greedy_trace, quality

try:
    import torchao  # noqa: F401
except ImportError:
    if REQUIRE_FIXTURES:  # CI installs the quant extra: there a missing torchao fails instead of skipping
        raise
    pytest.skip("the quant extra is not installed: pip install -e '.[quant]'", allow_module_level=True)

# Per case: last-token logit error (relative to the largest logit) at most, teacher-forced greedy agreement at
# least; and over all cases, the mean agreement at least. Measured: int8 error 0.011-0.026, agreement 0.88-1
# (mean 0.97); int4 error 0.10-0.27, agreement 0.38-0.81 (mean 0.64).
BOUNDS = {"int8": (0.04, 0.85, 0.93), "int4": (0.35, 0.3, 0.55)}


@pytest.fixture(scope="module")
def loaded():
    """(checkpoint, mode or None) -> model, loaded on first use."""
    import owlvid

    fixtures_or_skip("owl3")
    fixtures_or_skip("slowfast")
    models = {}

    def get(checkpoint: str, mode: str | None):
        if (checkpoint, mode) not in models:
            folder, tokenizer = checkpoint_folder(checkpoint)
            models[checkpoint, mode] = owlvid.load(folder, tokenizer=tokenizer, dtype="float32", device="cpu",
                                                  quantize=mode)
        return models[checkpoint, mode]

    return get


@pytest.fixture(scope="module")
def measured(loaded):
    """(mode, checkpoint, case) -> Quality, each measured once."""
    results, references = {}, {}

    def get(mode: str, checkpoint: str, case: str):
        if (checkpoint, case) not in references:
            references[checkpoint, case] = greedy_trace(loaded(checkpoint, None).runtime, checkpoint, case)
        if (mode, checkpoint, case) not in results:
            results[mode, checkpoint, case] = quality(loaded(checkpoint, mode).runtime, references[checkpoint, case],
                                                      checkpoint, case)
        return results[mode, checkpoint, case]

    return get


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("checkpoint,case", CASES)
def test_quality_on_every_fixture_case(measured, mode, checkpoint, case):
    max_error, min_agreement, _ = BOUNDS[mode]
    q = measured(mode, checkpoint, case)
    assert 0 < q.logit_error <= max_error, f"{mode}: last-token logit error {q.logit_error:.4f}"
    assert q.forced_agreement >= min_agreement, f"{mode}: greedy agreement {q.forced_agreement:.2f}"
    if mode == "int4":  # four bits lose more than eight, on every case
        assert q.logit_error > measured("int8", checkpoint, case).logit_error


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_mean_greedy_agreement(measured, mode):
    mean = sum(measured(mode, ck, case).forced_agreement for ck, case in CASES) / len(CASES)
    assert mean >= BOUNDS[mode][2], f"{mode}: mean greedy agreement {mean:.3f}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("checkpoint,case", [("tiny-240728", "text_only"), (CASES[-1][0], "video_8f_single_turn")])
def test_both_kernel_paths_keep_the_quality(loaded, monkeypatch, mode, checkpoint, case):
    """Every row through the quantized kernel, then every row (decoding too) through the weight dequantized on
    the fly: both within the quality bounds, and the same model to float32 rounding."""
    from owlvid import quantize

    reference = greedy_trace(loaded(checkpoint, None).runtime, checkpoint, case)
    runtime = loaded(checkpoint, mode).runtime
    max_error, min_agreement, _ = BOUNDS[mode]
    errors = []
    for limit in (1 << 30, 0):
        monkeypatch.setitem(quantize.KERNEL_MAX_ROWS, mode, limit)
        q = quality(runtime, reference, checkpoint, case)
        assert 0 < q.logit_error <= max_error and q.forced_agreement >= min_agreement, (limit, q)
        errors.append(q.logit_error)
    assert abs(errors[0] - errors[1]) <= 1e-4, errors


def test_what_is_quantized(loaded):
    """Decoder projections and the embedding (and an untied LM head); never the cross-attention projections
    (hyper / slow-token K/V, gates), the vision tower or the projector."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization import Int8Tensor

    for checkpoint in ("tiny-241101", "tiny-slowfast-qwen2-convnext576-s1t4"):
        for mode, kind in (("int8", Int8Tensor), ("int4", Int4OpaqueTensor)):
            net = loaded(checkpoint, mode).runtime.model
            layer = net.llm.layers[1]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert type(getattr(layer.self_attn, name).weight) is kind
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert type(getattr(layer.mlp, name).weight) is kind
            assert type(net.lm_head.weight) is kind
            assert type(net.llm.embed_tokens.weight) is Int8Tensor
            cross = [m for name, m in net.llm.named_modules() if name.endswith(("v_kv_proj", "cross_attn_kv_proj"))]
            assert cross and all(type(m.weight) is torch.nn.Parameter for m in cross)
            vision = net.vision if hasattr(net, "vision") else net.vision_tower
            assert all(type(p) is torch.nn.Parameter for p in vision.parameters())
            report = loaded(checkpoint, mode).runtime.quantization
            assert report.mode == mode and "llm.embed_tokens" in report.quantized


def test_weight_bytes_at_aligned_widths(tmp_path):
    """A tied checkpoint (as mPLUG-Owl3 1B/2B) whose widths are multiples of 128: the language model's weight
    bytes, quantized tensors' data, scales and zero points included."""
    import owlvid
    from owlvid.quantize import language_model_bytes
    from owlvid.testing import make_tiny_owl3

    folder = make_tiny_owl3(tmp_path / "tied", "241014", hidden=256, layers=2, hyper_layers=(1,))
    base = owlvid.load(folder, dtype="bfloat16", device="cpu")
    before = language_model_bytes(base.runtime.model)
    ratios = {}
    for mode in ("int8", "int4"):
        model = owlvid.load(folder, dtype="bfloat16", device="cpu", quantize=mode)
        report = model.runtime.quantization
        assert report.bytes_before == before and report.bytes_after == language_model_bytes(model.runtime.model)
        assert model.describe()["language_model_bytes"] == report.bytes_after
        ratios[mode] = report.bytes_after / before
    # int8: 1 byte + a float32 scale per row of 256; int4: half a byte + bf16 scale and zero per 128, with
    # the embedding (the tied LM head) in int8. The biases, norms and hyper layers' own weights stay bf16.
    assert ratios["int8"] <= 0.55 and ratios["int4"] <= 0.40, ratios
    assert ratios["int4"] < ratios["int8"]


@pytest.fixture
def paths(monkeypatch):
    """Counts of the calls to each dequantized path; KERNEL_MAX_ROWS restored after the test."""
    from owlvid import quantize

    calls = {"int8": 0, "int4": 0}
    monkeypatch.setattr(quantize, "KERNEL_MAX_ROWS", dict(quantize.KERNEL_MAX_ROWS))

    def counting(mode: str, real):
        def counted(*args):
            calls[mode] += 1
            return real(*args)
        return counted

    monkeypatch.setattr(quantize, "int8_dequantized_linear", counting("int8", quantize.int8_dequantized_linear))
    monkeypatch.setattr(quantize, "int4_dequantize_t", counting("int4", quantize.int4_dequantize_t))
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_paths_match_the_dequantized_weight(paths, dtype):
    from owlvid import quantize
    from owlvid.quantize import quantize_weight, register_kernels

    register_kernels()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype)
    q = quantize_weight(w, "int8")
    reference_weight = q.dequantize(torch.float32)
    assert (reference_weight - w.float()).abs().max() <= w.float().abs().max() / 127  # half a step per row
    quantize.KERNEL_MAX_ROWS["int8"] = 8
    for rows, dequantized in ((1, 0), (8, 0), (9, 1), (40, 2)):  # the int8 matrix-vector kernel up to 8 rows
        x = torch.randn(1, rows, 64, generator=gen).to(dtype)
        got = linear(x, q, bias).float()
        want = F.linear(x.float(), reference_weight, bias.float())
        assert got.shape == (1, rows, 96)
        assert (got - want).abs().max() <= (0.02 if dtype == torch.bfloat16 else 1e-5) * want.abs().max(), rows
        assert paths["int8"] == dequantized, rows


@pytest.mark.parametrize("shape", [(4864, 896), (128, 896), (80, 256), (24, 48)])
def test_int4_dequantized_weight_is_the_kernels_own(shape):
    """The unpacked weight equals what the CPU int4 kernel computes with (read back through an identity
    input), bit for bit: full blocks of 64 rows (the 1B widths), a partial block, padded sizes."""
    from owlvid.quantize import int4_dequantize_t, int4_pack_block, quantize_weight

    assert int4_pack_block() is not None  # this torch's layout is one the code knows
    n, k = shape
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(2)) / k ** 0.5).to(torch.bfloat16)
    q = quantize_weight(w, "int4")
    eye = torch.eye(q.shape[1], dtype=torch.bfloat16)
    by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.qdata, q.block_size[-1], q.scale_and_zero)
    assert torch.equal(int4_dequantize_t(q)[:, :n], by_kernel[:, :n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_paths_agree_and_are_chosen_by_row_count(paths, dtype):
    from owlvid import quantize
    from owlvid.quantize import quantize_weight, register_kernels

    register_kernels()
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(80, 256, generator=gen) / 16).to(dtype)
    bias = torch.randn(80, generator=gen).to(dtype)
    q = quantize_weight(w, "int4")
    quantize.KERNEL_MAX_ROWS["int4"] = 4
    for rows, dequantized in ((1, False), (2, False), (3, True), (33, True)):  # [2, rows]: 2, 4 | 6, 66 rows
        x = torch.randn(2, rows, 256, generator=gen).to(dtype)
        before = paths["int4"]
        chosen = linear(x, q, bias)
        assert paths["int4"] - before == dequantized, rows
        quantize.KERNEL_MAX_ROWS["int4"] = 1 << 30 if rows > 2 else 0  # the other path
        other = linear(x, q, bias)
        quantize.KERNEL_MAX_ROWS["int4"] = 4
        assert chosen.shape == other.shape == (2, rows, 80)
        # The same products: float32 agrees to rounding, bfloat16 to its last bits of the output
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert (chosen.float() - other.float()).abs().max() <= tolerance * other.float().abs().max(), rows


def test_int4_padding_matches_an_explicitly_padded_weight():
    """Input sizes the CPU int4 kernel cannot take (48 = not whole groups of 32) and output sizes that are not
    multiples of 16 are zero-padded: the same result as quantizing a weight padded by hand."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    from owlvid.quantize import quantize_weight, register_kernels

    register_kernels()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 48, generator=gen)
    x = torch.randn(3, 48, generator=gen)
    q = quantize_weight(w, "int4")
    assert q.shape == (24, 64)
    by_hand = Int4OpaqueTensor.from_hp(F.pad(w, (0, 16, 0, 8)), [1, 32])
    got = linear(x, q)
    assert got.shape == (3, 24)
    assert torch.equal(got, F.linear(F.pad(x, (0, 16)), by_hand)[:, :24])
    assert (got - F.linear(x, w)).abs().max() <= 0.25 * F.linear(x, w).abs().max()


def test_int8_embedding_looks_up_dequantized_rows(loaded):
    emb = loaded("tiny-241101", "int8").runtime.model.llm.embed_tokens
    ids = torch.tensor([[0, 5, 151000]])
    rows = emb(ids)
    assert rows.dtype == torch.float32 and rows.shape == (1, 3, 16)
    assert torch.allclose(rows[0], emb.weight.dequantize()[ids[0]])


def test_unsupported_combinations_are_refused_in_one_line():
    from owlvid.quantize import check_supported

    with pytest.raises(InputError, match="quantize must be one of int8, int4"):
        check_supported("int3", torch.device("cpu"), torch.float32)
    with pytest.raises(UnsupportedError, match="int4' on CUDA needs dtype bfloat16"):
        check_supported("int4", torch.device("cuda"), torch.float32)
    with pytest.raises(UnsupportedError, match="runs on cpu or cuda, not mps"):
        check_supported("int8", torch.device("mps"), torch.float32)


def run_owlvid(*args: str, block_torchao: bool = False) -> subprocess.CompletedProcess:
    # A torchao that cannot be imported, as when the quant extra is not installed.
    prelude = "import sys; sys.modules['torchao'] = None; " if block_torchao else "import sys; "
    code = prelude + "from owlvid.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def fixture_args() -> list[str]:
    folder, tokenizer = checkpoint_folder("tiny-241101")
    return ["--model", str(folder), "--tokenizer", str(tokenizer), "--device", "cpu", "--dtype", "float32"]


def test_cli_quantize_flag(loaded):
    import json

    fixtures_or_skip("owl3")
    proc = run_owlvid("ask", "What is the capital of France?", "--json", "--max-new-tokens", "8", "--quantize",
                      "int8", *fixture_args())
    assert proc.returncode == 0, proc.stderr
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    expected = loaded("tiny-241101", "int8").generate(messages, max_new_tokens=8)
    assert json.loads(proc.stdout)["text"] == expected.text

    info = {}
    for mode in (None, "int4"):
        extra = ["--quantize", mode] if mode else []
        proc = run_owlvid("info", "--json", *extra, *fixture_args())
        assert proc.returncode == 0, proc.stderr
        info[mode] = json.loads(proc.stdout)
    assert info[None]["quantize"] is None and info["int4"]["quantize"] == "int4"
    assert info["int4"]["language_model_bytes"] < 0.6 * info[None]["language_model_bytes"]


def test_cli_without_torchao_says_how_to_install_it():
    fixtures_or_skip("owl3")
    proc = run_owlvid("ask", "hello", "--quantize", "int8", *fixture_args(), block_torchao=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["owlvid: error: quantize='int8' needs torchao: pip install 'owlvid[quant]'"], proc.stderr


def test_cli_refuses_an_unknown_mode():
    proc = run_owlvid("ask", "hello", "--quantize", "int3", *fixture_args())
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batched_decoding_gives_the_tokens_of_each_request_alone(loaded, mode):
    """Batched rows go through the same quantized kernels (2-32 rows) as one row alone."""
    model = loaded("tiny-241101", mode)
    conversations = [[{"role": "user", "content": text}] for text in
                     ("hello there, how are you?", "What is 2+2? Answer briefly please.", "x")]
    alone = [model.generate(c, max_new_tokens=10).token_ids for c in conversations]
    assert [g.token_ids for g in model.generate_batch(conversations, max_new_tokens=10)] == alone


@pytest.mark.parametrize("command", [["serve"], ["batch", "-i", "in.jsonl", "-o", "out.jsonl"], ["chat"]])
def test_serve_batch_and_chat_take_the_flag(command):
    from owlvid.cli import build_parser

    assert build_parser().parse_args([*command, "--quantize", "int4"]).quantize == "int4"
    assert build_parser().parse_args(command).quantize is None
