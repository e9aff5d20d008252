"""`owlvid plan`: a folder holding only config.json, the table, --json, refusals as one line."""

from __future__ import annotations

import json

from owlvid.cli import main
from owlvid.plan import GiB

from ..conftest import fixtures_or_skip
from .published import OWL3_7B_241101, SLOWFAST_7B_FRAME64


def _config_only(tmp_path, config: dict):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_table_from_a_folder_with_only_config_json(tmp_path, capsys):
    folder = _config_only(tmp_path, OWL3_7B_241101)
    rc = main(["plan", str(folder), "--max-memory", "cuda:0=14GiB,cuda:1=14GiB,cpu=32GiB", "--max-frames", "64",
               "--device-map", "balanced"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mPLUG-Owl3 (fused), 28 layers (4 hyper)" in out and "64 frames, batch 8, 4096 tokens" in out
    assert "total                          14.98" in out
    assert "56.0 KiB" in out and "5.70 MiB" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("cuda:", "cpu "))}
    assert set(rows) == {"cuda:0", "cuda:1", "cpu"}
    assert rows["cuda:0"][1] == "14.00" and "vision," in " ".join(rows["cuda:0"])
    assert "head" in rows["cuda:1"][-1] and rows["cpu"][-1] == "-"  # balanced over the GPUs; nothing offloaded
    assert all(float(rows[d][5]) >= 0 for d in rows)


def test_json_and_the_config_file_itself(tmp_path, capsys):
    folder = _config_only(tmp_path, SLOWFAST_7B_FRAME64)
    assert main(["plan", str(folder / "config.json"), "--max-memory", "cuda:0=22GiB", "--json",
                 "--quantize", "int8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "slowfast" and plan["settings"]["max_frames"] == 64  # its training frame count
    assert plan["settings"]["quantize"] == "int8" and plan["visual_kv_bytes_per_frame"] == 4 * 81 * 2 * 512 * 2
    assert plan["devices"][0]["headroom"] > 0 and plan["device_map"]["lm_head"] == "cuda:0"
    assert sum(plan["weights_bytes"].values()) < 9 * GiB


def test_refusal_is_one_line_with_what_would_fit(tmp_path, capsys):
    folder = _config_only(tmp_path, OWL3_7B_241101)
    rc = main(["plan", str(folder), "--max-memory", "cuda:0=16GiB", "--max-frames", "128", "--max-batch", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("owlvid: error: owl3 fused (bfloat16, 128 frames, batch 1") and "--quantize int8" in err
    for bad in (["--max-memory", "cuda:0=lots"], ["--max-memory", "gpu=3GiB"], ["--visual-cache", "big"]):
        assert main(["plan", str(folder), *bad]) == 2
        assert capsys.readouterr().err.startswith("owlvid: error:")
    assert main(["plan", str(tmp_path / "missing")]) != 0
    assert "not found" in capsys.readouterr().err


def test_detected_memory_and_checkpoint_shapes(capsys):
    """Without --max-memory, this machine's memory; a folder with weights reads their shapes (headers)."""
    folder = fixtures_or_skip("owl3", "tiny-240728")
    assert main(["plan", str(folder), "--visual-cache", "0"]) == 0
    out = capsys.readouterr().out
    assert "(dynamic_gate)" in out and "visual cache 0.00 GiB" in out
    assert any(line.startswith("cpu ") for line in out.splitlines())
