"""Quantized loading saves memory: weights are quantized as they are read (quantize.LoadQuantizer), never the
whole model unquantized first, and what is replaced is handed back to the system.

Measured in a fresh subprocess (VmHWM / VmRSS growth over the RSS after the imports), on a random
mPLUG-Owl3-shaped checkpoint of 8 layers x 25 MB of bf16 weights (201 MB; 103 MB in int8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, REQUIRE_FIXTURES

try:
    import torchao  # noqa: F401
except ImportError:
    if REQUIRE_FIXTURES:
        raise
    pytest.skip("the quant extra is not installed: pip install -e '.[quant]'", allow_module_level=True)

MARGIN = 24 << 20  # the loader's small allocations, tokenizer, RoPE table, one tensor's quantization temporaries

CHILD = r"""
import json, sys
import torch
from owlvid.quantize import import_torchao, quantize_weight, register_kernels
import_torchao("int8"); register_kernels()
import owlvid
from owlvid.quantize import tensor_bytes
# torchao's first quantization initialises the library once (~35 MB, whatever the model): not the load's cost
quantize_weight(torch.randn(256, 256, dtype=torch.bfloat16), "int8")

def status(field):
    return int(next(x for x in open("/proc/self/status") if x.startswith(field)).split()[1]) * 1024

base = status("VmRSS")
model = owlvid.load(sys.argv[1], device="cpu", dtype="bfloat16", quantize=sys.argv[2] or None, cache_bytes=0)
net = model.runtime.model
layer = sum(p.numel() * p.element_size() for p in net.llm.layers[0].parameters()) if not sys.argv[2] else 0
print(json.dumps({"peak": status("VmHWM") - base, "after": status("VmRSS") - base,
                  "weights": sum(tensor_bytes(p) for p in net.parameters())}))
"""


def _measure(folder, mode: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode or ""], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from owlvid.testing import make_tiny_owl3

    return make_tiny_owl3(tmp_path_factory.mktemp("q") / "ckpt", "241101", hidden=1024, layers=8,
                          hyper_layers=(2, 6))


def test_int8_load_peaks_at_the_quantized_model_plus_one_layer(checkpoint):
    plain = _measure(checkpoint, None)
    int8 = _measure(checkpoint, "int8")
    layer_bf16 = 2 * (1024 * 1024 * 2 + 512 * 1024 * 2 + 3 * 3072 * 1024)  # one decoder layer's projections
    assert plain["weights"] > 195e6 and int8["weights"] < 0.55 * plain["weights"]
    assert int8["peak"] <= int8["weights"] + layer_bf16 + MARGIN, (int8, layer_bf16)
    assert int8["after"] <= int8["weights"] + MARGIN, int8
    assert int8["peak"] < plain["peak"] * 0.7, (int8, plain)


def test_quantized_while_loading_equals_quantized_after(tmp_path):
    """LoadQuantizer and quantize_language_model (the loaded model quantized in place) give the same model."""
    import owlvid
    from owlvid.quantize import quantize_language_model
    from owlvid.testing import make_tiny_owl3

    folder = make_tiny_owl3(tmp_path / "t", "241014", hidden=256, layers=2, hyper_layers=(1,))
    messages = [{"role": "user", "content": "Describe a cat."}]
    for mode in ("int8", "int4"):
        loaded = owlvid.load(folder, dtype="bfloat16", device="cpu", quantize=mode)
        after = owlvid.load(folder, dtype="bfloat16", device="cpu")
        report = quantize_language_model(after.runtime.model, mode)
        assert report.quantized == loaded.runtime.quantization.quantized
        assert report.bytes_before == loaded.runtime.quantization.bytes_before
        assert report.bytes_after == loaded.runtime.quantization.bytes_after
        assert torch.equal(loaded.next_token_logits(messages), after.next_token_logits(messages))


def test_int8_rows_in_chunks_equal_one_call(monkeypatch):
    """int8_per_row works a few rows at a time (bounded temporaries) and gives torchao's tensor exactly."""
    from torchao.quantization import Int8Tensor

    from owlvid import quantize

    monkeypatch.setattr(quantize, "INT8_CHUNK_BYTES", 3 * 100 * 2)  # 3 rows per call: the last call has 1
    w = torch.randn(301, 100, dtype=torch.bfloat16) * torch.linspace(0.01, 10, 301, dtype=torch.bfloat16)[:, None]
    got, want = quantize.int8_per_row(w), Int8Tensor.from_hp(w, granularity=quantize._per_row())
    assert type(got) is Int8Tensor and got.shape == want.shape and list(got.block_size) == list(want.block_size)
    for name in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    x = torch.randn(4, 100, dtype=torch.bfloat16)
    assert torch.equal(torch.nn.functional.linear(x, got), torch.nn.functional.linear(x, want))
