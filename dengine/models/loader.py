"""Loading a local checkpoint folder: config, sharded or single safetensors, requested dtype.

Every file and every tensor is checked (presence, shape, dtype kind) before any weight memory is
allocated, so a bad folder raises one CheckpointError and leaves nothing half-loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from dengine.config import CheckpointError, ModelConfig, read_json
from dengine.kv.kv_cache import available_memory_bytes
from dengine.models import MODEL_FAMILIES
from dengine.models.transformer import DiffusionLM

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_KINDS = {"F32", "F16", "BF16", "F64"}
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,  # for exactness checks; never fast
}


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (oneDNN's bf16 kernels: AVX512 BW/VL/DQ, AVX512-BF16, AMX or
    AVX-NE-CONVERT). Without them (an AVX2-only CPU) torch emulates bf16 matmuls: llada-chain decodes 5-9x
    slower than in fp32 (docs/benchmarks.md 4d)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# "auto" keeps bf16 on a CPU without bf16 hardware when fp32 weights would take more than this share of the
# free memory (a full-size checkpoint: 32 GB in fp32), leaving the rest for the KV pool and the activations
AUTO_FP32_MEMORY_SHARE = 0.5


def auto_dtype(num_params: int, device: torch.device) -> torch.dtype:
    """dtype "auto": bf16 (the checkpoints' own dtype) where the device computes it; on a CPU without bf16
    hardware fp32, which is several times faster there, unless fp32 weights would not leave room to serve."""
    if device.type != "cpu" or cpu_computes_bf16():
        return torch.bfloat16
    if 4 * num_params > AUTO_FP32_MEMORY_SHARE * available_memory_bytes(device):
        logger.warning("this CPU has no bf16 hardware (bf16 matmuls are emulated, several times slower than "
                       "fp32), but fp32 weights (%.1f GB) would not leave room to serve: loading bf16",
                       4 * num_params / 1e9)
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name such as "bfloat16" or "float32" ("auto" is resolved by load_model)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in set(_DTYPES.values()):
            raise ValueError(f"dtype {dtype} is not supported; use bfloat16, float16, float32 or float64")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def read_model_config(path: str | Path) -> tuple[type[DiffusionLM], ModelConfig]:
    """The model family class and its parsed config for a checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    raw = read_json(path / "config.json")
    generation = read_json(path / "generation_config.json", required=False)
    model_type = raw.get("model_type")
    family = MODEL_FAMILIES.get(str(model_type).lower())
    if family is None:
        raise CheckpointError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported; "
            f"dengine implements {sorted(MODEL_FAMILIES)}"
        )
    try:
        return family, family.parse_config(raw, generation)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it, checking that the files exist."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' of tensor names to shard files")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}
    raise CheckpointError(f"{path}: no weights found (neither {INDEX_FILE} nor {SINGLE_FILE})")


def _group_by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    return by_file


def _check_tensors(model: DiffusionLM, files: dict[str, Path]) -> dict[str, tuple[str, int]]:
    """Check names, shapes and dtypes; return tensor name -> (parameter name, first row)."""
    params = dict(model.named_parameters())
    targets: dict[str, tuple[str, int]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for param_name, parts in model.checkpoint_layout().items():
        row = 0
        for tensor_name, rows in parts:
            targets[tensor_name] = (param_name, row)
            shapes[tensor_name] = (rows, *params[param_name].shape[1:])
            row += rows
    missing = sorted(set(targets) - set(files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")
    unexpected = sorted(set(files) - set(targets))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"checkpoint has tensor {unexpected[0]!r}{more} that a {model.model_type} model does not use"
        )
    for file, names in _group_by_file(files).items():
        with safe_open(file, framework="pt") as handle:
            present = set(handle.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name!r} is listed in {INDEX_FILE} but not stored here")
                found = handle.get_slice(name)
                shape, kind = tuple(found.get_shape()), found.get_dtype()
                if shape != shapes[name]:
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {list(shape)}, expected {list(shapes[name])}")
                if kind not in _FLOAT_KINDS:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {kind}, expected a float type")
    return targets


def check_weights_fit(model: DiffusionLM, device: torch.device, path: Path) -> None:
    """Refuse, before any weight memory is allocated, a model whose weights exceed the device's free memory."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    available = available_memory_bytes(device)
    if weights > available:
        dtype = next(model.parameters()).dtype
        raise MemoryError(f"{path}: the weights take {weights / 1e9:.2f} GB in {dtype} but only {available / 1e9:.2f} GB "
                          f"of {device.type} memory is free; free memory, or load a smaller dtype")


def load_model(
    path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
) -> DiffusionLM:
    """Build the checkpoint's model on device in dtype ("auto": auto_dtype), with every tensor checked before
    loading."""
    path = Path(path)
    device = torch.device(device)
    torch_dtype = None if dtype == "auto" else resolve_dtype(dtype)
    if torch_dtype == torch.bfloat16 and device.type == "cpu" and not cpu_computes_bf16():
        logger.warning("%s: loading bf16 as asked, but this CPU has no bf16 hardware: its bf16 matmuls are emulated, "
                       "several times slower than fp32 (dtype 'auto' picks fp32 here)", path)
    family, config = read_model_config(path)
    files = tensor_files(path)
    with torch.device("meta"):
        model = family(config)
        if torch_dtype is None:
            torch_dtype = auto_dtype(sum(p.numel() for p in model.parameters()), device)
        model = model.to(torch_dtype)
    targets = _check_tensors(model, files)
    check_weights_fit(model, device, path)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for file, names in _group_by_file(files).items():
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    param_name, row = targets[name]
                    tensor = handle.get_tensor(name)
                    params[param_name][row : row + tensor.shape[0]].copy_(tensor)
    return model.eval()
