"""owlvid vs the OFFICIAL mPLUG-Owl3 PyTorch code, side by side, on one random-weight checkpoint at the 1B shape.

What runs: the official mPLUG-Owl3 **7B-240728** Hugging Face remote code (the only official PyTorch code that
is public: the 1B/2B-241014 and 7B-241101 modeling files were never published outside the hub; the X-PLUG/
mPLUG-Owl GitHub repository holds the README, demo and evaluation code only) given a **1B-241014-shaped**
config.json: Qwen2-0.5B widths (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151851
rows, tied embeddings, hyper layers [6, 13, 20, 22]) and SigLIP-so400m at 384 px. The hyper layers therefore
carry 240728's dynamic gate (`gate_proj`, [64, 64]) rather than 241014's static one: a few kFLOP per token,
nothing measurable. Weights are random (seed 0, bf16 on disk like the released files, upcast at load), written
once in the official layout (config.json in the official schema, official tensor names, model.safetensors)
under /tmp/owlvid-bench/ together with the real Qwen2 tokenizer (shared/fixtures/owl3/tokenizer); owlvid loads
the same folder unchanged with `owlvid.load(path, dtype=...)`.

Each engine runs in its own process with the same torch thread count; both are loaded (one after the other) and
kept, and their requests alternate (one warm-up each, then rounds in ABBA order), so that other work on a
shared machine hits both alike:
  official  /work/official-venv/bin/python: `mPLUGOwl3Model.from_pretrained(path, attn_implementation="sdpa")`,
            `model.init_processor(tokenizer)`, `processor(messages, videos=...)`, `model.generate(...,
            do_sample=False, min_new_tokens=N)` (the README's entry points; flash-attn is not installed, so the
            sdpa path runs, as for the parity goldens)
  owlvid    this interpreter: `owlvid.load(path, dtype=..., cache_bytes=0)` and `Model.iter_generate`
            (greedy). The EOS tokens are removed from its stop list (the official side gets `min_new_tokens`)
            so both decode the same count; prefix reuse (`prefix_slots`) and the visual cache are off, so
            every measured request is cold, as the official code's are.
The same messages (a ~30-token chat prompt; optionally 8 video frames through the official `<|video|>`
placeholder) go to both; the script checks that the prompt token ids are identical. They are for text; for video
they differ by design: owlvid reads a tied-embedding dynamic-gate checkpoint as the 1B/2B-241014 family and
wraps the frames in `<|start_video_frame|>` ... `<|end_video_frame|>` (13 more prompt tokens), which the 240728
processor does not.

Measured, per engine and case: TTFT (messages -> first token: processing, vision, prefill, the first greedy
token; median of `--runs` after one warm-up), decode tokens/s (tokens 2..N of the same runs, median), peak RSS
of the process (VmHWM: load and all runs), and the number of leading greedy tokens that agree between the two.

One-time setup of the official environment (torch first, the CPU build pinned to the project's version;
no flash-attn; torchvision comes from PyPI as its CUDA build, whose C++ ops cannot load against the CPU torch:
the worker declares the two operator schemas torchvision's import registers fake kernels for, nms/qnms, which
mPLUG-Owl3 never calls; its Python transforms are what the official image processor uses):

    python3 -m venv /work/official-venv
    /work/official-venv/bin/pip install torch==2.13.0
    /work/official-venv/bin/pip install transformers==4.41.2 "numpy<2" einops icecream pillow safetensors \\
        "torchvision==0.28.*"

The official code: the verbatim copy of the HF repository mPLUG/mPLUG-Owl3-7B-240728 in GitHub AdaCheng/
EgoThink (models/mPLUG-Owl3-7B-240728, commit fbafe8f, the files the parity goldens were made with); give a bare
git dir + commit (`--official-git`, `--official-commit`, `--official-subdir`; the files are extracted to a
temporary folder at run time) or a folder holding them (`--official-dir`, e.g. a download of the HF repo).

    flock /work/bench.lock /work/main/.venv/bin/python benchmarks/official_owl3.py            # text only
    flock /work/bench.lock /work/main/.venv/bin/python benchmarks/official_owl3.py --threads 1  # other load hurts less
    flock /work/bench.lock /work/main/.venv/bin/python benchmarks/official_owl3.py --video-frames 8 --no-text \\
        --runs 1 --warmup 0 --new-tokens 32                                                    # ~3 min

Measured (AMD EPYC, 2 cores shared with other jobs, no bf16 hardware, float32, torch 2.13.0, transformers 4.41.2;
36-token text prompt, 64 greedy tokens, medians of 3 interleaved runs; all 64 tokens agree):
  threads 2: TTFT official 0.590 s, owlvid 0.502 s (1.18x faster); decode 5.98 vs 6.41 tok/s (1.07x);
             peak RSS 6036 vs 3784 MiB
  threads 1: TTFT 0.764 vs 0.634 s (1.20x); decode 6.20 vs 6.12 tok/s (0.99x)
  8 frames, threads 2, one run: TTFT 61.5 vs 42.1 s (1.46x); decode 3.01 vs 6.00 tok/s (2.0x)
With 2 threads the official code slows down far more than owlvid when another process holds a core (probably OpenMP
waits in its ~170 small parallel ops per token): 1.2 vs 5.5 tok/s in one such run. Compare runs at a quiet
moment (the load average is printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path("/tmp/owlvid-bench")
CHECKPOINT = CACHE / "owl3-1b-shape-240728-random"
TOKENIZER = Path("/work/shared/fixtures/owl3/tokenizer")
GOLDEN_META = Path("/work/shared/fixtures/owl3/cases/tiny-240728/text_only/meta.json")  # sha256 of the code used
OFFICIAL_PYTHON = "/work/official-venv/bin/python"
OFFICIAL_GIT = "/work/.mirror/AdaCheng+EgoThink/repo"
OFFICIAL_COMMIT = "fbafe8f"
OFFICIAL_SUBDIR = "models/mPLUG-Owl3-7B-240728"
OFFICIAL_FILES = ["configuration_hyper_qwen2.py", "configuration_mplugowl3.py", "modeling_hyper_qwen2.py",
                  "modeling_mplugowl3.py", "processing_mplugowl3.py", "image_processing_mplugowl3.py",
                  "x_sdpa.py"]

# mPLUG-Owl3-1B-241014's config.json fields (docs/mplug_owl3.md section 1), in the official schema.
CONFIG_1B = {
    "architectures": ["mPLUGOwl3Model"],
    "auto_map": {"AutoConfig": "configuration_mplugowl3.mPLUGOwl3Config",
                 "AutoModel": "modeling_mplugowl3.mPLUGOwl3Model",
                 "AutoModelForCausalLM": "modeling_mplugowl3.mPLUGOwl3Model"},
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
    "max_window_layers": 24, "model_type": "mplugowl3", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151851, "hyper_layers": [6, 13, 20, 22],
    "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "In one or two sentences: how does a barn owl find a mouse under snow?"},
    {"role": "assistant", "content": ""},
]
VIDEO_QUESTION = "<|video|>\nWhat happens in this video?"


# ----------------------------------------------------------------------------------------------- helpers


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def video_frames(n: int, seed: int = 0) -> list:
    """`n` 640x360 noise frames (each a shifted copy of the first), the same in both processes."""
    import numpy as np
    from PIL import Image

    base = np.random.default_rng(seed).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    return [Image.fromarray(np.roll(base, 7 * i, axis=1)) for i in range(n)]


def case_messages(frames: int) -> list[dict]:
    if frames == 0:
        return copy.deepcopy(MESSAGES)
    return [{"role": "user", "content": VIDEO_QUESTION}, {"role": "assistant", "content": ""}]


def run_record(start: float, stamps: list[float], tokens: list[int], prompt_ids: list[int]) -> dict:
    """One request: TTFT (messages -> first token) and the decode rate over tokens 2..N."""
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "tokens": tokens, "prompt_ids": prompt_ids, "peak_rss_mib": peak_rss_mib()}


def serve(one_run, info: dict) -> None:
    """Worker loop: report `info` once loaded, then answer `run FRAMES` with one request's record and `quit`.
    The driver interleaves the two engines' runs, so that other work on the machine hits both alike."""
    print("RESULT " + json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "run":
            print("RESULT " + json.dumps(run_record(*one_run(int(cmd[1])))), flush=True)
        elif cmd and cmd[0] == "quit":
            return


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- workers
# Each worker prints one JSON line (prefixed RESULT) on stdout; they import only what their venv has.


def import_torchvision() -> None:
    """torchvision's PyPI wheel is a CUDA build whose C++ ops cannot load against the CPU torch; its import
    still registers fake kernels for torchvision::nms / qnms, which fails unless the schemas exist. Declare
    them (never called: mPLUG-Owl3 only uses torchvision's Python transforms)."""
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_LIB
    _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


_TORCHVISION_LIB = None


def build_worker(args: argparse.Namespace) -> None:
    """Write the random checkpoint: the official model's own state-dict keys and shapes (built on the meta
    device), values drawn like benchmarks/perf.py (N(0,1)/sqrt(fan_in) matrices, N(0,1) embeddings, unit
    norms, zero biases), stored in bf16; the tied lm_head is not stored (as in the released 1B file)."""
    import math

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, args.code)
    import_torchvision()
    from configuration_mplugowl3 import mPLUGOwl3Config
    from modeling_mplugowl3 import mPLUGOwl3Model

    out = Path(args.out)
    config = mPLUGOwl3Config.from_pretrained(out)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = mPLUGOwl3Model(config)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "language_model.lm_head.weight":
            continue  # tied to the embeddings
        if p.dim() >= 2:
            draw = torch.randn(p.shape, generator=gen)
            value = draw if "embed_tokens" in name else draw / math.sqrt(math.prod(p.shape[1:]))
        elif "norm" in name and name.endswith("weight"):
            value = torch.ones(p.shape)
        else:
            value = torch.zeros(p.shape)
        tensors[name] = value.to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in tensors.values())
    print("RESULT " + json.dumps({"tensors": len(tensors), "params": params}), flush=True)


def official_worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, StoppingCriteria, StoppingCriteriaList

    set_threads(args.threads)
    sys.path.insert(0, args.code)
    import_torchvision()
    import transformers
    from modeling_mplugowl3 import mPLUGOwl3Model

    t0 = time.perf_counter()
    model = mPLUGOwl3Model.from_pretrained(args.checkpoint, attn_implementation="sdpa",
                                           torch_dtype=getattr(torch, args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    processor = model.init_processor(tokenizer)
    load_s, load_rss = time.perf_counter() - t0, rss_mib()
    frames_cache: dict[int, list] = {}

    class Stamps(StoppingCriteria):
        """Called by generate() right after each new token is appended: its timestamp."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    @torch.inference_mode()
    def one_run(n_frames: int) -> tuple[float, list[float], list[int], list[int]]:
        frames = frames_cache.setdefault(n_frames, video_frames(n_frames)) if n_frames else None
        stamps = Stamps()
        start = time.perf_counter()
        inputs = processor(case_messages(n_frames), images=None, videos=[frames] if frames else None)
        out = model.generate(**inputs, tokenizer=tokenizer, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                             stopping_criteria=StoppingCriteriaList([stamps]))
        return start, stamps.times, out[0].tolist(), inputs["input_ids"][0].tolist()

    serve(one_run, {"load_s": load_s, "rss_after_load_mib": load_rss,
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__}})


def owlvid_worker(args: argparse.Namespace) -> None:
    import torch

    import owlvid
    from owlvid.engine import TokenEvent

    set_threads(args.threads)
    t0 = time.perf_counter()
    model = owlvid.load(args.checkpoint, device="cpu", dtype=args.dtype, cache_bytes=0)
    model.runtime.prefix_slots = 0  # every request cold, like the official code's
    model.runtime.stop_token_ids = []  # decode exactly N tokens (the official side: min_new_tokens=N)
    load_s, load_rss = time.perf_counter() - t0, rss_mib()
    frames_cache: dict[int, list] = {}

    @torch.inference_mode()
    def one_run(n_frames: int) -> tuple[float, list[float], list[int], list[int]]:
        frames = frames_cache.setdefault(n_frames, video_frames(n_frames)) if n_frames else None
        videos = [frames] if frames else None
        times: list[float] = []
        start = time.perf_counter()
        result = None
        for event in model.iter_generate(case_messages(n_frames), videos=videos, max_new_tokens=args.new_tokens):
            if isinstance(event, TokenEvent):
                times.append(time.perf_counter())
            else:
                result = event
        tokens = result.token_ids
        _, prompt_ids = model.prepare(case_messages(n_frames), videos=videos)  # after timing: cheap, not timed
        # One TokenEvent per token, then possibly a text flush at the very end: keep one stamp per token.
        return start, times[: len(tokens)], tokens, prompt_ids

    serve(one_run, {"load_s": load_s, "rss_after_load_mib": load_rss,
                    "versions": {"torch": torch.__version__, "owlvid": getattr(owlvid, "__version__", "?")}})


# ----------------------------------------------------------------------------------------------- driver


def official_code(args: argparse.Namespace, tmp: Path) -> Path:
    """The official files in a folder of their own (they import each other by plain module name)."""
    if args.official_dir:
        return Path(args.official_dir)
    code = tmp / "official"
    code.mkdir()
    for name in OFFICIAL_FILES:
        text = subprocess.run(["git", "--git-dir", args.official_git, "show",
                               f"{args.official_commit}:{args.official_subdir}/{name}"],
                              check=True, capture_output=True).stdout
        (code / name).write_bytes(text)
    return code


def same_as_goldens(code: Path) -> str:
    """Whether the official files are byte-identical to those the parity goldens were made with."""
    import ast
    import hashlib

    try:
        ref = json.loads(GOLDEN_META.read_text())["reference_sha256"]
        ref = ast.literal_eval(ref) if isinstance(ref, str) else ref
    except (OSError, KeyError, ValueError, SyntaxError):
        return "unknown"
    same = all(hashlib.sha256((code / n).read_bytes()).hexdigest() == ref.get(n) for n in OFFICIAL_FILES)
    return "yes" if same else "NO"


def ensure_checkpoint(args: argparse.Namespace, code: Path) -> None:
    if (CHECKPOINT / "model.safetensors").exists():
        return
    tmp = CHECKPOINT.with_name(CHECKPOINT.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(CONFIG_1B, indent=2) + "\n")
    for f in TOKENIZER.iterdir():
        shutil.copy(f, tmp / f.name)
    print(f"building the random checkpoint in {CHECKPOINT} (once) ...", flush=True)
    run_worker(args.official_python, ["--role", "build", "--code", str(code), "--out", str(tmp)], args.threads)
    tmp.rename(CHECKPOINT)


def worker_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(python: str, argv: list[str], threads: int) -> dict:
    """A one-shot worker (the checkpoint build): its RESULT line."""
    proc = subprocess.run([python, str(Path(__file__).resolve()), *argv], env=worker_env(threads),
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {argv[:2]} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


class Worker:
    """A loaded engine in its own process, answering `run FRAMES` requests one at a time."""

    def __init__(self, name: str, python: str, argv: list[str], threads: int, tmp: Path) -> None:
        self.name = name
        self.stderr_path = tmp / f"{name}.stderr"
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), *argv], env=worker_env(threads),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr_path, "w"), text=True, bufsize=1)
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.proc.wait()
        sys.stderr.write(self.stderr_path.read_text()[-8000:])
        raise SystemExit(f"the {self.name} worker failed (exit {self.proc.returncode})")

    def run(self, frames: int) -> dict:
        self.proc.stdin.write(f"run {frames}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    flags = ""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    bf16 = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    return {"cpu": model, "bf16_hw": bf16, "cores": os.cpu_count()}


def leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=["driver", "build", "official", "owlvid"], default="driver")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--runs", type=int, default=3, help="measured runs per case (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per engine before each case")
    p.add_argument("--video-frames", type=int, default=0, help="also measure this many video frames (0: text only)")
    p.add_argument("--no-text", action="store_true", help="skip the text-only case (with --video-frames)")
    p.add_argument("--official-python", default=OFFICIAL_PYTHON)
    p.add_argument("--official-git", default=OFFICIAL_GIT)
    p.add_argument("--official-commit", default=OFFICIAL_COMMIT)
    p.add_argument("--official-subdir", default=OFFICIAL_SUBDIR)
    p.add_argument("--official-dir", help="a folder with the official .py files (instead of --official-git)")
    p.add_argument("--json", help="also write the results here")
    # worker-only
    p.add_argument("--code")
    p.add_argument("--out")
    p.add_argument("--checkpoint", default=str(CHECKPOINT))
    args = p.parse_args()
    if args.role == "build":
        return build_worker(args)
    if args.role == "official":
        return official_worker(args)
    if args.role == "owlvid":
        return owlvid_worker(args)

    with tempfile.TemporaryDirectory(prefix="official-owl3-") as tmp:
        code = official_code(args, Path(tmp))
        ensure_checkpoint(args, code)
        common = ["--threads", str(args.threads), "--dtype", args.dtype, "--new-tokens", str(args.new_tokens),
                  "--checkpoint", str(CHECKPOINT), "--code", str(code)]
        identical = same_as_goldens(code)
        workers = {}
        try:
            # Loaded one after the other (load time is reported), then kept: both stay in memory.
            for engine, python in (("official", args.official_python), ("owlvid", sys.executable)):
                print(f"loading {engine} ...", flush=True)
                workers[engine] = Worker(engine, python, ["--role", engine, *common], args.threads, Path(tmp))
            cases = ([] if args.no_text else [0]) + ([args.video_frames] if args.video_frames else [])
            rows = [measure_case(workers, frames, args.runs, args.warmup) for frames in cases]
        finally:
            for w in workers.values():
                w.close()
    report(args, rows, identical)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows,
                                               "official_code_as_goldens": identical}, indent=1))


def measure_case(workers: dict, frames: int, runs: int, warmup: int) -> dict:
    """`warmup` unmeasured rounds, then `runs` rounds; the engine that goes first alternates (ABBA), so that a change in
    the machine's other load during the rounds hits both engines alike."""
    case = "text only" if frames == 0 else f"{frames} video frames"
    order = ["official", "owlvid"]
    records: dict[str, list[dict]] = {e: [] for e in order}
    loads = []
    for i in range(warmup + runs):
        print(f"{case}: round {i + 1}{' (warm-up)' if i < warmup else ''} ...", flush=True)
        loads.append(os.getloadavg()[0])
        for engine in order if i % 2 == 0 else order[::-1]:
            record = workers[engine].run(frames)
            if i >= warmup:
                records[engine].append(record)
    row = {"case": case, "loadavg": loads + [os.getloadavg()[0]]}
    for engine, recs in records.items():
        row[engine] = {"ttft_s": statistics.median(r["ttft_s"] for r in recs),
                       "ttft_all_s": [r["ttft_s"] for r in recs],
                       "decode_tok_s": statistics.median(r["decode_tok_s"] for r in recs),
                       "decode_all_tok_s": [r["decode_tok_s"] for r in recs],
                       "peak_rss_mib": recs[-1]["peak_rss_mib"], "tokens": recs[-1]["tokens"],
                       "prompt_ids": recs[-1]["prompt_ids"], **workers[engine].info}
    off, own = row["official"], row["owlvid"]
    row.update(prompt_tokens=len(off["prompt_ids"]), same_prompt=off["prompt_ids"] == own["prompt_ids"],
               agree=leading_equal(off["tokens"], own["tokens"]), new_tokens=len(own["tokens"]))
    return row


def report(args: argparse.Namespace, rows: list[dict], identical: str) -> None:
    m = machine()
    v = rows[0]["official"]["versions"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, bf16 hardware: {'yes' if m['bf16_hw'] else 'no'}; "
          f"torch threads {args.threads}; dtype {args.dtype}; torch {v['torch']}, official side transformers "
          f"{v['transformers']} (sdpa)")
    print("checkpoint: random weights, mPLUG-Owl3-1B-241014 shape, official 7B-240728 code (dynamic gate); "
          f"greedy, {args.new_tokens} new tokens; medians of {args.runs} runs after {args.warmup} warm-up; "
          f"official files identical to the parity goldens' (sha256): {identical}\n")
    print("| case | engine | TTFT s, median (best) | decode tok/s, median (best) | peak RSS MiB | load s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for engine in ("official", "owlvid"):
            e = r[engine]
            print(f"| {r['case']} | {engine} | {e['ttft_s']:.3f} ({min(e['ttft_all_s']):.3f}) | "
                  f"{e['decode_tok_s']:.2f} ({max(e['decode_all_tok_s']):.2f}) | {e['peak_rss_mib']:.0f} | "
                  f"{e['load_s']:.1f} |")
        off, own = r["official"], r["owlvid"]
        print(f"| {r['case']} | **owlvid vs official** | **{off['ttft_s'] / own['ttft_s']:.2f}x faster** "
              f"({min(off['ttft_all_s']) / min(own['ttft_all_s']):.2f}x) | "
              f"**{own['decode_tok_s'] / off['decode_tok_s']:.2f}x** "
              f"({max(own['decode_all_tok_s']) / max(off['decode_all_tok_s']):.2f}x) | "
              f"{own['peak_rss_mib'] / off['peak_rss_mib']:.2f}x | |")
    print()
    for r in rows:
        print(f"{r['case']}: {r['prompt_tokens']} prompt tokens, identical prompt ids: {r['same_prompt']}; "
              f"greedy tokens agreeing from the start: {r['agree']} of {r['new_tokens']}; "
              f"TTFT runs official {fmt_list(r['official']['ttft_all_s'])} owlvid "
              f"{fmt_list(r['owlvid']['ttft_all_s'])}; decode runs official "
              f"{fmt_list(r['official']['decode_all_tok_s'])} owlvid {fmt_list(r['owlvid']['decode_all_tok_s'])}; "
              f"1-min load average at each round {fmt_list(r['loadavg'])}")


def fmt_list(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


if __name__ == "__main__":
    main()
