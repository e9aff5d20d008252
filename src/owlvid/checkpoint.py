"""Finding checkpoints (local folder or Hugging Face hub), choosing device/dtype, loading weights."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, UnsupportedError

CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "*.json", "*.txt",
                    "*.tiktoken"]


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       progress: bool = True) -> Path:
    """A local directory is used as is (no network); anything else is a hub id fetched into the
    Hugging Face cache (once; later calls find it there, offline included)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is not a checkpoint folder: it has no config.json")
        return path
    if not is_hub_id(name_or_path):
        raise CheckpointError(f"checkpoint {str(name_or_path)!r} not found: give a local folder or a hub id like "
                              "'mPLUG/mPLUG-Owl3-7B-241101'")
    return download_checkpoint(str(name_or_path), revision=revision, progress=progress)


def is_hub_id(name_or_path: str | os.PathLike) -> bool:
    """Whether `resolve_checkpoint` would look this name up on the hub (not an existing path, not written
    as a path, `owner/name`)."""
    name = str(name_or_path)
    return not (Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1)


def download_checkpoint(repo_id: str, *, revision: str | None = None, progress: bool = True) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES)
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"cannot download {repo_id!r}: the hub is unreachable and it is not in the "
                              f"local cache ({type(e).__name__})") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"cannot download {repo_id!r}: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot download {repo_id!r}: {e}") from None
    return Path(folder)


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {e}") from None


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("device 'cuda' requested but no CUDA GPU is available")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    elif dtype in _DTYPES:
        chosen = _DTYPES[dtype]
    else:
        raise UnsupportedError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if chosen not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedError(f"dtype {chosen} is not supported: use float32, bfloat16 or float16")
    if device.type == "cpu" and chosen == torch.float16:
        raise UnsupportedError("float16 is not supported on the CPU: use bfloat16 or float32")
    if device.type == "cuda" and chosen == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UnsupportedError("this GPU does not support bfloat16: use float16")
    return chosen


def _shard_keys(folder: Path) -> dict[Path, set[str] | None]:
    """Weight file -> the keys model.safetensors.index.json assigns to it (None without an index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read {index}: {e}") from None
        shards: dict[Path, set[str] | None] = {}
        for key, name in sorted(weight_map.items()):
            shards.setdefault(folder / name, set()).add(key)
        return shards
    single = folder / "model.safetensors"
    if single.exists():
        return {single: None}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")
    return dict.fromkeys(files)


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _name, _attr in (("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # newer torch versions only
        _ST_DTYPES[_name] = getattr(torch, _attr)


def _read_header(file: Path) -> tuple[dict, int]:
    """The safetensors JSON header of `file` and the byte offset where tensor data starts.

    `safetensors.safe_open` validates the file first (header, dtypes, offsets in bounds, contiguous and
    non-overlapping); the tensors themselves are then read with plain file reads (see iter_checkpoint)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read weights {file}: not a valid safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _checked_headers(folder: Path) -> Iterator[tuple[Path, dict, int]]:
    """(file, header, data start) per weight file; a key stored twice, or not where the index says, is an
    error (a mixed-up shard set would otherwise load whichever copy comes last)."""
    seen: dict[str, Path] = {}
    for file, listed in _shard_keys(folder).items():
        header, data_start = _read_header(file)
        for key in header:
            if key in seen:
                raise CheckpointError(f"tensor {key!r} is stored twice: in {seen[key].name} and {file.name}")
            seen[key] = file
        if listed is not None and listed != set(header):
            odd = sorted(listed ^ set(header))[0]
            where = "lists" if odd in listed else "does not list"
            raise CheckpointError(f"model.safetensors.index.json {where} {odd!r} in {file.name}, but the file "
                                  f"{'lacks' if odd in listed else 'holds'} it (mismatched shards?)")
        yield file, header, data_start


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the checkpoint, read from the headers only."""
    return {k: tuple(v["shape"]) for _, header, _ in _checked_headers(folder) for k, v in header.items()}


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, reader) for every tensor. A reader reads that tensor with plain file reads straight into a
    fresh tensor: no memory map, so already-loaded tensors never stay resident twice (peak memory is the
    final weights plus one tensor).

    Not `safe_open(...).get_tensor` (benchmarks/load_weights.py, 207 MB bf16 file, 2 CPUs): one map per
    file keeps every touched page resident, so a float32 load peaked at 1.51x the weights (plain reads
    1.19x; tests/test_checkpoint.py bounds it at 1.3x), and bf16 weights stay lazily mapped from the
    checkpoint file; one map per tensor fixes the peak (1.02x) but made bf16 loads 3.8x slower (1.19 s vs
    0.31 s). safe_open still validates every file (see _read_header)."""
    for file, header, data_start in _checked_headers(folder):
        with open(file, "rb") as f:
            for key, info in header.items():
                def read(f=f, info=info, key=key, file=file, start=data_start) -> torch.Tensor:
                    return _read_tensor(f, info, start, key, file)

                yield key, read


def iter_file(file: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, reader) for every tensor of one safetensors file (e.g. a LoRA adapter's), read as
    `iter_checkpoint` reads a checkpoint's files."""
    header, data_start = _read_header(file)
    with open(file, "rb") as f:
        for key, info in header.items():
            def read(info=info, key=key) -> torch.Tensor:
                return _read_tensor(f, info, data_start, key, file)

            yield key, read


def _read_tensor(f, info: dict, data_start: int, key: str, file: Path) -> torch.Tensor:
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"tensor {key!r} in {file} has unsupported dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    tensor = torch.empty(info["shape"], dtype=dtype)
    raw = tensor.reshape(-1).view(torch.uint8)
    if raw.numel() != end - begin:
        raise CheckpointError(f"tensor {key!r} in {file}: {end - begin} bytes for shape {info['shape']}")
    f.seek(data_start + begin)
    if raw.numel() and f.readinto(memoryview(raw.numpy())) != raw.numel():
        raise CheckpointError(f"weights file {file} is truncated (tensor {key!r})")
    return tensor


def load_weights(module: nn.Module, folder: Path, key_map: Callable[[str], str | None],
                 dtype: torch.dtype, device: torch.device | Callable[[str], torch.device],
                 keep_dtype: Callable[[str], bool] | None = None,
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fill `module` (built on the meta device) from the checkpoint, one tensor at a time.

    `key_map` maps a checkpoint key to a parameter name of `module`, or None to skip it. Every tensor
    is cast once to `dtype` on `device` (or `device(name)`: a model split across devices), so peak memory stays
    close to the final weights. `transform(name, tensor)`, when given, replaces each tensor before it is stored
    (quantize.LoadQuantizer quantizes there).
    """
    expected = dict(module.named_parameters())
    expected.update(dict(module.named_buffers()))
    loaded: set[str] = set()
    for key, read in iter_checkpoint(folder):
        name = key_map(key)
        if name is None:
            continue
        if name not in expected:
            raise CheckpointError(f"checkpoint tensor {key!r} does not belong to this model (wrong checkpoint?)")
        target = expected[name]
        tensor = read()
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(target.shape)} (config.json does not match the weights)")
        want = target.dtype if keep_dtype and keep_dtype(name) else dtype
        tensor = tensor.to(device=device(name) if callable(device) else device, dtype=want)
        _assign(module, name, transform(name, tensor) if transform is not None else tensor)
        del tensor  # a transformed tensor's original goes now, before the next one is read
        if transform is not None:
            release_freed_memory()  # and so do the transform's temporaries (see release_freed_memory)
        loaded.add(name)
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is missing tensor for {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim, which also releases whole free pages
    inside the heap). Tensors under the mmap threshold (up to 32 MB once it has grown) come from the heap, and
    glibc keeps what they free: a load that quantizes tensor by tensor would otherwise grow the heap by every
    tensor's temporaries (measured: 450 MB peak for 108 MB of int8 weights; tests/test_quantize_load.py)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor
