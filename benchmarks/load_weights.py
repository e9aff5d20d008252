"""Weight-reading benchmark: owlvid's plain file reads against `safetensors.safe_open` (one map per file,
and one map per tensor), on a random mPLUG-Owl3-shaped checkpoint (bf16 file, as released).

Each reader loads every tensor and casts it to the target dtype (what `checkpoint.load_weights` does on
the CPU), in a fresh subprocess; the table gives the wall time and the peak RSS growth (VmHWM, which
counts touched pages of a memory map) over the size of the loaded weights.

    PYTHONPATH=src python benchmarks/load_weights.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import sys, time, torch
from pathlib import Path
from owlvid.checkpoint import iter_checkpoint
mode, folder, dtype = sys.argv[1], Path(sys.argv[2]), getattr(torch, sys.argv[3])
file = str(folder / "model.safetensors")

def status(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field))
    return int(line.split()[1]) * 1024

def owlvid_reads():
    for key, read in iter_checkpoint(folder):
        yield key, read()

def safe_open_per_file():
    from safetensors import safe_open
    with safe_open(file, framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)

def safe_open_per_tensor():
    from safetensors import safe_open
    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor(key)
            yield key, (t.clone() if t.dtype == dtype else t)  # a copy: the map is released per tensor

readers = {"owlvid": owlvid_reads, "safe_open/file": safe_open_per_file, "safe_open/tensor": safe_open_per_tensor}
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
start = time.perf_counter()
out = {k: v.to(dtype) for k, v in readers[mode]()}
elapsed = time.perf_counter() - start
size = sum(v.numel() * v.element_size() for v in out.values())
print(f"{elapsed:.3f} {(status('VmHWM') - base) / size:.2f} {size / 1e6:.0f}")
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from owlvid.testing import make_tiny_owl3

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_owl3(Path(tmp) / "ckpt", "241101", hidden=args.hidden, layers=args.layers,
                                hyper_layers=(3,))
        print(f"{'reader':18s} {'dtype':9s} {'time (s)':>9s} {'peak/size':>10s} {'weights MB':>11s}")
        for dtype in ("bfloat16", "float32"):
            for mode in ("owlvid", "safe_open/file", "safe_open/tensor"):
                runs = [subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), dtype], check=True,
                                       capture_output=True, text=True).stdout.split() for _ in range(args.repeat)]
                best = min(runs, key=lambda r: float(r[0]))
                print(f"{mode:18s} {dtype:9s} {float(best[0]):9.3f} {float(best[1]):10.2f} {best[2]:>11s}")


if __name__ == "__main__":
    main()
