"""The memory plan (owlvid.plan) against measured peak RSS on the CPU, at the real mPLUG-Owl3 1B/2B shapes.

Each model runs in its own subprocess (one at a time: a few GB each): the network is built at the published
shape with random bf16 weights (no checkpoint needed), then answers one question about a video of N random
frames (greedy, a few tokens). Reported, each as growth over the RSS after the imports:

* `built`: RSS once the weights are in memory, against the plan's weights;
* `peak`: VmHWM over the whole run (weights + caches + the vision tower's activations + the prefill), against
  the plan's total for a `cpu` device (batch 1, context = the request's KV capacity, no visual LRU cache).

* `SF-tower`: Slow-Fast's ConvNeXt-XXL tower and projector alone, encoding N frames, against the plan's vision
  group (weights + activation peak).

    PYTHONPATH=src python benchmarks/plan_check.py [--models 1B,2B,SF-tower] [--frames 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import numpy as np, torch
import owlvid
from owlvid.api import Model
from owlvid.layers import RotaryTable
from owlvid.models.owl3 import Owl3Runtime
from owlvid.models.owl3.config import owl3_config
from owlvid.models.owl3.model import Owl3
from owlvid.plan import model_shape, need, plan_memory
from owlvid.tokenizer import QwenTokenizer
from tests.plan.published import PUBLISHED

def status(field):
    return int(next(x for x in open("/proc/self/status") if x.startswith(field)).split()[1]) * 1024

name, frames, tokenizer_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[4])
config = PUBLISHED[name]
shape = model_shape(config)
prefix = "language_model.model.layers"
keys = {f"{prefix}.{i}.self_attn.v_kv_proj.weight": (1,) for i in shape.special_layers}
keys[f"{prefix}.0.self_attn.gate" if shape.variant == "static_gate" else f"{prefix}.0.self_attn.gate_proj.0.weight"
     if shape.variant == "dynamic_gate" else "vision2text_model.0.weight"] = (1,)
if not shape.tied:
    keys["language_model.lm_head.weight"] = (1,)
cfg = owl3_config(config, keys)
folder = Path(tempfile.mkdtemp())
(folder / "config.json").write_text(json.dumps(config))
tok = QwenTokenizer.from_dir(tokenizer_dir)
frames_in = [np.random.default_rng(i).integers(0, 255, (384, 384, 3), dtype=np.uint8) for i in range(frames)]
baseline = status("VmRSS")

torch.set_default_dtype(torch.bfloat16)
with torch.device("meta"):
    net = Owl3(cfg)
torch.set_default_dtype(torch.float32)
net.to_empty(device="cpu")
with torch.no_grad():
    for pname, p in net.named_parameters():
        p.fill_(1.0) if pname.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight")) \
            else p.normal_(0, 0.02)
net.requires_grad_(False)
net.rope = RotaryTable(cfg.llm.head_dim, cfg.llm.rope_theta, cfg.llm.max_position_embeddings, "cpu")
net.eval()
runtime = Owl3Runtime(net, cfg, tok, folder, torch.device("cpu"), torch.bfloat16, None)
model = Model(runtime, name)
built = status("VmRSS")
messages = [{"role": "user", "content": [{"type": "video", "video": frames_in},
                                         {"type": "text", "text": "What happens in this video?"}]}]
out = model.generate(messages, max_new_tokens=8, temperature=0.0)
peak = status("VmHWM")
plan = plan_memory(config, max_memory={"cpu": 1 << 45}, max_frames=frames, max_batch=1,
                   max_model_len=out.prompt_tokens + 256, visual_cache_bytes=0)
dev = plan.devices[0]
print(json.dumps({"model": name, "frames": frames, "prompt_tokens": out.prompt_tokens,
                  "built": built - baseline, "peak": peak - baseline, "plan_weights": plan.weights,
                  "plan_total": need(dev.groups, "cpu"), "plan_cache": dev.cache, "plan_peak": dev.peak}))
shutil.rmtree(folder)
'''

# Slow-Fast's tower alone (ConvNeXt-XXL at 576 px + projector, 1.7 GB in bf16; the whole 7B would not fit
# beside the other work of a shared machine): its weights and the peak of encoding N frames against the plan's
# vision group.
CHILD_TOWER = r'''
import json, sys
sys.path.insert(0, sys.argv[3])
import torch
from torch import nn
from owlvid.models.slowfast.config import slowfast_config
from owlvid.models.slowfast.model import SlowFast
from owlvid.models.slowfast.vision import ConvNeXt, build_projector
from owlvid.plan import plan_memory
from tests.plan.published import SLOWFAST_7B_FRAME64 as config

def status(field):
    return int(next(x for x in open("/proc/self/status") if x.startswith(field)).split()[1]) * 1024

frames = int(sys.argv[2])
shapes = {"model.embed_tokens.weight": (152064, 3584), "lm_head.weight": (152064, 3584)}
shapes.update({f"model.layers.{i}.self_attn.cross_attn_kv_proj.weight": (1, ) for i in (0, 8, 16, 24)})
cfg = slowfast_config(config, shapes)
pixels = torch.rand(frames, 3, 576, 576)
baseline = status("VmRSS")

class Tower(nn.Module):  # what SlowFast.encode_frames reads of the network
    def __init__(self):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = ConvNeXt(cfg.vision)
        self.mm_projector = build_projector(cfg.projector, cfg.mm_hidden_size, cfg.llm.hidden_size)
        self._param = self.mm_projector[0].weight

torch.set_default_dtype(torch.bfloat16)
with torch.device("meta"):
    tower = Tower()
torch.set_default_dtype(torch.float32)
tower.to_empty(device="cpu")
with torch.no_grad():
    for p in tower.parameters():
        p.normal_(0, 0.02)
tower._param = tower.mm_projector[0].weight
tower.eval()
built = status("VmRSS")
features = SlowFast.encode_frames(tower, pixels)
peak = status("VmHWM")
plan = plan_memory(config, max_memory={"cpu": 1 << 45}, max_frames=frames, max_batch=1, max_model_len=2048)
vision = plan.groups[0]
print(json.dumps({"model": "Slow-Fast tower", "frames": frames, "prompt_tokens": 0, "built": built - baseline,
                  "peak": peak - baseline, "plan_weights": vision.weights,
                  "plan_total": vision.weights + vision.peak["cpu"]}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1B,2B")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--tokenizer", default=str(REPO / "tests" / "fixtures" / "owl3" / "tokenizer"))
    args = ap.parse_args()
    names = {"1B": "mPLUG-Owl3-1B-241014", "2B": "mPLUG-Owl3-2B-241014", "SF-tower": "Slow-Fast tower"}
    mib = 2**20
    print(f"{'model':<22}{'frames':>7}{'built MiB':>11}{'plan weights':>14}{'ratio':>7}{'peak MiB':>10}"
          f"{'plan total':>12}{'ratio':>7}")
    for key in args.models.split(","):
        child = CHILD_TOWER if key == "SF-tower" else CHILD
        done = subprocess.run([sys.executable, "-c", child, names[key], str(args.frames), str(REPO), args.tokenizer],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{key}: {done.stderr.strip().splitlines()[-1]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['model']:<22}{r['frames']:>7}{r['built'] / mib:>11.0f}{r['plan_weights'] / mib:>14.0f}"
              f"{r['built'] / r['plan_weights']:>7.3f}{r['peak'] / mib:>10.0f}{r['plan_total'] / mib:>12.0f}"
              f"{r['peak'] / r['plan_total']:>7.3f}")


if __name__ == "__main__":
    main()
