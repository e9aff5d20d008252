"""`owlvid plan MODEL`: the memory plan as a table (registered by owlvid.cli; the planner is owlvid.plan).

Only config.json is read: a folder holding just that file works, and a hub id fetches just that file. When the
folder also has the weights, their tensor shapes (headers only) settle what config.json leaves open.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..plan import GiB, MemoryPlan, parse_max_memory, parse_size, plan_memory


def add_parser(sub: Any, debug: argparse.ArgumentParser, positive_int: Callable[[str], int]) -> None:
    p = sub.add_parser("plan", parents=[debug], help="memory plan: what fits on which device, before loading",
                       description="Weights per module group, KV cache per token, visual K/V per frame, the vision "
                       "tower's activation peak and the placement per device with headroom, computed from "
                       "config.json alone (no weights are read). Refuses in one line when the model does not fit, "
                       "saying what would.")
    p.add_argument("model_arg", nargs="?", metavar="MODEL",
                   help="checkpoint folder (config.json is enough), config.json file, or hub id")
    p.add_argument("--model", "-m", default=None, help=argparse.SUPPRESS)
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--device-map", default="auto", choices=["auto", "balanced"],
                   help="auto: fill the devices in order, the rest to cpu when listed; balanced: equal loads on "
                   "the GPUs (default: auto)")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="what owlvid may use per device, e.g. cuda:0=14GiB,cuda:1=14GiB,cpu=64GiB (default: every "
                   "visible GPU less 1 GiB, and the available RAM as cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="(default: bfloat16)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")
    p.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                   help="frames per video, or image crops, per request (default: mPLUG-Owl3 16, Slow-Fast its "
                   "training frame count)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="B",
                   help="requests decoded together (default: 8, as serve/batch)")
    p.add_argument("--max-model-len", type=positive_int, default=4096, metavar="L",
                   help="tokens per request, prompt and answer (default: 4096)")
    p.add_argument("--visual-cache", default=None, metavar="SIZE",
                   help="the in-memory visual feature cache (default: owlvid.load's 2GiB for mPLUG-Owl3)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def read_plan_config(model: str, revision: str | None = None) -> tuple[dict, dict | None]:
    """(config.json, tensor shapes or None) of a folder, a config.json file or a hub id; no weights read."""
    path = Path(model).expanduser()
    if path.is_file():
        folder, config_file = path.parent, path
    elif path.is_dir():
        folder, config_file = path, path / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{path} is not a checkpoint folder: it has no config.json")
    else:
        from ..checkpoint import is_hub_id

        if not is_hub_id(model):
            raise CheckpointError(f"checkpoint {model!r} not found: give a folder, a config.json or a hub id")
        folder, config_file = None, _hub_config(model, revision)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_file}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} does not hold a JSON object")
    shapes = None
    if folder is not None and any(folder.glob("*.safetensors")):
        from ..checkpoint import checkpoint_shapes

        shapes = checkpoint_shapes(folder)
    return config, shapes


def _hub_config(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"cannot fetch {repo_id!r}/config.json: the hub is unreachable and it is not in the "
                              f"local cache ({type(e).__name__})") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot fetch {repo_id!r}/config.json: {str(e).splitlines()[0]}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    model = args.model_arg or args.model
    if model is None:
        from ..api import DEFAULT_MODEL

        model = DEFAULT_MODEL
    config, shapes = read_plan_config(str(model), args.revision)
    from ..stages import detected_max_memory  # torch: only when no --max-memory is given

    memory = parse_max_memory(args.max_memory) if args.max_memory else detected_max_memory()
    plan = plan_memory(config, max_memory=memory, device_map=args.device_map, dtype=args.dtype,
                       quantize=args.quantize, max_frames=args.max_frames, max_batch=args.max_batch,
                       max_model_len=args.max_model_len, shapes=shapes,
                       visual_cache_bytes=parse_size(args.visual_cache) if args.visual_cache else None)
    print(json.dumps(plan_json(plan, str(model)), indent=2) if args.json else format_plan(plan, str(model)))
    return 0


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"


def _modules(groups: list) -> str:
    """'vision, embedding, layers 0-9' (consecutive layers collapsed)."""
    words: list[str] = []
    run: list[int] = []
    for g in groups + [None]:
        if g is not None and g.name.startswith("llm.layers."):
            run.append(int(g.name.rsplit(".", 1)[1]))
            continue
        if run:
            words.append(f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}")
            run = []
        if g is not None:
            words.append({"vision": "vision", "llm.embed_tokens": "embedding", "lm_head": "head"}[g.name])
    return ", ".join(words) or "-"


def format_plan(plan: MemoryPlan, name: str) -> str:
    s, st = plan.shape, plan.settings
    family = {"owl3": "mPLUG-Owl3", "slowfast": "Slow-Fast"}[s.family]
    special = "hyper" if s.family == "owl3" else "cross-attention"
    groups = {g.name: g for g in plan.groups}
    plain = [g.weights for n, g in groups.items() if n.startswith("llm.layers.") and g.label == "layer"]
    extra = [g.weights for n, g in groups.items() if n.startswith("llm.layers.") and int(n.rsplit(".", 1)[1])
             in s.special_layers]
    layer_sum = sum(g.weights for n, g in groups.items() if n.startswith("llm.layers."))
    peak = plan.vision_peak
    lines = [
        f"{name}: {family} ({s.variant}), {s.layers} layers ({len(s.special_layers)} {special}), hidden {s.hidden}, "
        f"vocab {s.vocab}, {'tied' if s.tied else 'untied'} LM head",
        f"{st.quantize or st.dtype}, {st.max_frames} frames, batch {st.max_batch}, {st.max_model_len} tokens, "
        f"visual cache {_g(st.visual_cache_bytes)} GiB, device map {plan.device_map}",
        "",
        "weights (GiB)",
        f"  {groups['vision'].label:<28}{_g(groups['vision'].weights):>8}",
        f"  {groups['llm.embed_tokens'].label:<28}{_g(groups['llm.embed_tokens'].weights):>8}",
        f"  {'decoder layers':<28}{_g(layer_sum):>8}  ({s.layers} x {_g(plain[0] if plain else extra[0])}"
        + (f", {special} layers {_g(extra[0])}" if extra and plain else "") + ")",
        f"  {groups['lm_head'].label:<28}{_g(groups['lm_head'].weights):>8}",
        f"  {'total':<28}{_g(plan.weights):>8}",
        f"KV cache per token            {plan.kv_per_token / 1024:.1f} KiB (all layers; x {st.max_batch + 1} rows x "
        f"{st.max_model_len} tokens = {_g(plan.kv_per_token * (st.max_batch + 1) * st.max_model_len)} GiB)",
        f"visual K/V per frame          {plan.visual_kv_per_frame / 2**20:.2f} MiB ({len(s.special_layers)} "
        f"{special} layers, {s.visual_tokens} tokens per frame)",
        f"vision activation peak        {_g(peak['cuda'])} GiB on a GPU, {_g(peak['cpu'])} GiB on the CPU "
        f"({st.max_frames} frames' features included)",
        "",
        f"{'device':<8}{'budget':>8}{'weights':>9}{'cache':>8}{'peak':>7}{'headroom':>10}  modules",
    ]
    for d in plan.devices:
        lines.append(f"{d.device:<8}{_g(d.budget):>8}{_g(d.weights):>9}{_g(d.cache):>8}{_g(d.peak):>7}"
                     f"{_g(d.headroom):>10}  {_modules(d.groups)}")
    return "\n".join(lines)


def plan_json(plan: MemoryPlan, name: str) -> dict:
    st = plan.settings
    return {"model": name, "family": plan.shape.family, "variant": plan.shape.variant,
            "settings": {"dtype": st.dtype, "quantize": st.quantize, "max_frames": st.max_frames,
                         "max_batch": st.max_batch, "max_model_len": st.max_model_len,
                         "visual_cache_bytes": st.visual_cache_bytes, "device_map": plan.device_map},
            "weights_bytes": {g.name: g.weights for g in plan.groups}, "kv_bytes_per_token": plan.kv_per_token,
            "visual_kv_bytes_per_frame": plan.visual_kv_per_frame, "vision_peak_bytes": plan.vision_peak,
            "devices": [{"device": d.device, "budget": d.budget, "weights": d.weights, "cache": d.cache,
                         "peak": d.peak, "headroom": d.headroom, "modules": [g.name for g in d.groups]}
                        for d in plan.devices],
            "device_map": plan.device_of()}
