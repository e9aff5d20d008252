"""`owlvid batch` needs only the base install: no FastAPI, Starlette, uvicorn or prometheus_client (the server
extra). A real `owlvid batch` process in which those packages cannot be imported answers a job."""

from __future__ import annotations

import json
import subprocess
import sys

from owlvid.testing import make_tiny_owl3

BLOCK = """
import importlib.abc, sys
class NoServerExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("fastapi", "starlette", "uvicorn", "prometheus_client"):
            raise ImportError(f"{name} is not installed (base install)", name=name)
        return None
sys.meta_path.insert(0, NoServerExtra())
from owlvid.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_batch_runs_without_the_server_extra(tmp_path):
    model = make_tiny_owl3(tmp_path / "tiny", "241101")
    source = tmp_path / "in.jsonl"
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": f"Hi {i}"}]}}
             for i in range(2)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-c", BLOCK, "batch", "-i", str(source), "-o", str(output), "--model",
                           str(model), "--dtype", "float32", "--no-progress"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answers) == ["q0", "q1"]
    assert all(a["response"]["status_code"] == 200 for a in answers)
    assert "fastapi" not in done.stderr.lower()
