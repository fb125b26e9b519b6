"""Load a local Hugging Face checkpoint: ``config.json`` + ``*.safetensors``.

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``)
checkpoints both work. Every tensor the model needs must be present with the right
shape; errors name the file and the tensor. A rank of a parallel replica builds the
model of its shard and reads only its slice of each tensor (``get_slice``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.kv_cache.spec import model_fingerprint
from engine.layers.basic import prepack_linears
from engine.layers.weights import WeightRead, WeightTarget
from engine.model_spec import ModelSpec, parse_model_spec
from engine.models import build_model
from engine.models.llama import CausalLM
from engine.parallel import build as parallel_build
from engine.parallel.state import SINGLE, ParallelState
from engine.quant.config import parse_quant_config
from engine.quant.linear import apply_quantization

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: CausalLM
    spec: ModelSpec
    fingerprint: str
    """Stable id of config + weight names, used in the KV layout handshake."""
    local_spec: ModelSpec
    """This rank's shard of ``spec`` (``spec`` itself on a single rank)."""


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json in {model_dir}; pass a local Hugging Face checkpoint directory "
            "(build a demo one with `pdserve make-tiny-model --arch llama DIR`)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weight files in {root}")
    return files


def _layer(model: CausalLM, target: WeightTarget) -> tuple[torch.nn.Module, str]:
    owner, _, name = target.param.rpartition(".")
    return model.get_submodule(owner), name


def _read(module: torch.nn.Module, name: str, target: WeightTarget) -> WeightRead:
    """The slice of the on-disk tensor that ``target``'s layer holds (all of it, unless
    the layer is a shard: engine/layers/weights.py; a quantized layer maps that slice
    onto its packed weight and scales: engine/quant/linear.py)."""
    read = getattr(module, "weight_read", None)
    read = read(name, target) if read is not None else WeightRead()
    quant = getattr(module, "quant", None)
    return quant.read(name, read) if quant is not None else read


def _copy(model: CausalLM, param: torch.Tensor, target: WeightTarget, f, name: str, file: Path):
    module, leaf = _layer(model, target)
    read = _read(module, leaf, target)
    dest = param if target.expert is None else param[target.expert]
    if read.dest_rows is not None:
        dest = dest[read.dest_rows]
    elif target.rows is not None:
        dest = dest[target.row_offset : target.row_offset + target.rows]
    tensor = f.get_slice(name)[read.source] if read.source else f.get_tensor(name)
    quant = getattr(module, "quant", None)
    if quant is not None:
        tensor = quant.convert(leaf, tensor, dest.shape, f"tensor {name} in {file.name}")
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ValueError(
            f"shape mismatch for tensor {name} in {file.name}: checkpoint has "
            f"{tuple(tensor.shape)}, config.json implies {tuple(dest.shape)}"
        )
    dest.copy_(tensor.to(param.dtype))


def _load_tensors(
    model: CausalLM, targets: dict[str, WeightTarget], files: list[Path]
) -> tuple[set[str], list[str]]:
    """Copy every targeted tensor; returns ``(loaded names, all names on disk)``."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    on_disk: list[str] = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read weight file {file}: {e}") from None
        with handle as f:
            for name in f.keys():
                on_disk.append(name)
                target = targets.get(name)
                if target is None:
                    logger.debug("ignoring tensor %s in %s", name, file.name)
                    continue
                _copy(model, params[target.param], target, f, name, file)
                loaded.add(name)
    return loaded, on_disk


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_positions: int | None = None,
    parallel: ParallelState = SINGLE,
) -> LoadedModel:
    """Build the model named by ``config.json`` (this rank's shard of it) and fill it from
    the safetensors files."""
    cfg = read_config(model_dir)
    spec = parse_model_spec(cfg, source=str(Path(model_dir) / "config.json"))
    files = weight_files(model_dir)
    logger.info("loading %s from %s (%d file(s))", spec.architecture, model_dir, len(files))
    local = parallel_build.local_spec(spec, parallel)
    experts = parallel_build.expert_range(spec, parallel)
    model, targets = build_model(local, max_positions or spec.max_position_embeddings, experts)
    parallel_build.apply_parallel(model, spec, parallel)
    model.to(dtype)
    _zero_padding(model)
    quant = parse_quant_config(cfg, source=str(Path(model_dir) / "config.json"))
    if quant is not None:
        targets = apply_quantization(model, targets, quant, dtype)  # after .to(dtype): FP8 stays
    loaded, on_disk = _load_tensors(model, targets, files)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise ValueError(f"checkpoint {model_dir} is missing {len(missing)} tensor(s): {shown}")
    model.to(device).eval()
    if torch.device(device).type == "cpu":
        prepack_linears(model)
    return LoadedModel(model, spec, model_fingerprint(cfg, on_disk), local)


def _zero_padding(model: CausalLM) -> None:
    """Rows no tensor fills (a vocabulary shard's padding) must not hold garbage."""
    for module in (model.embed, model.lm_head):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            weight.data.zero_()
