"""Unsupported quantization is refused at load, naming the scheme and the supported ones;
``pdserve make-tiny-model --quantize`` writes what the compressed-tensors package reads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open

from engine import LLM
from router.launch.cli import main
from tests.quant.checkpoints import build


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("quant-refuse"), "llama", "int8")


def _with_config(src, dst, edit) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _weights(q: dict) -> dict:
    return q["config_groups"]["group_0"]["weights"]


CASES = {
    "int4": (lambda q: _weights(q).update(num_bits=4), "int4"),
    "asymmetric": (lambda q: _weights(q).update(symmetric=False), "asymmetric"),
    "static-acts": (
        lambda q: q["config_groups"]["group_0"].update(
            input_activations={"num_bits": 8, "type": "float", "strategy": "tensor"}
        ),
        "float8 tensor symmetric static",
    ),
    "awq": (lambda q: q.update(quant_method="awq"), "quant_method='awq'"),
    "format": (lambda q: q.update(format="marlin-24"), "'marlin-24'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quant_unsupported_scheme_is_refused(int8_dir, tmp_path, case):
    edit, named = CASES[case]
    d = _with_config(int8_dir, tmp_path / case, edit)
    with pytest.raises(ValueError) as err:
        LLM(d)
    assert (
        named in str(err.value) and "fp8-w8a16" in str(err.value) and "int8-w8a16" in str(err.value)
    )


def test_quant_experts_quantized_are_refused(int8_dir, tmp_path):
    """A checkpoint whose config quantizes the routed experts (stacked matrices here)."""
    d = build(tmp_path, "qwen3_moe", "fp8")
    d = _with_config(d, tmp_path / "experts", lambda q: q.update(ignore=["lm_head"]))
    with pytest.raises(ValueError, match="quantized MoE expert weights.*experts"):
        LLM(d)


def test_quant_scheme_says_8_bit_but_tensor_is_float(int8_dir, tmp_path):
    """A layer the config quantizes whose tensor on disk is dense: refused, not misread."""
    edit = lambda q: q.update(ignore=[])  # noqa: E731 -- lm_head is stored dense
    d = _with_config(int8_dir, tmp_path / "lm", edit)
    with pytest.raises(ValueError, match="lm_head"):
        LLM(d)


def test_quant_make_tiny_model_cli_writes_compressed_tensors(tmp_path, capsys):
    out = tmp_path / "tiny-int8"
    assert main(["make-tiny-model", "--arch", "qwen3", "--quantize", "int8", str(out)]) == 0
    assert "int8" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    parsed = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        assert packed.dtype == torch.int32
        assert "model.layers.0.mlp.down_proj.weight" not in set(f.keys())
    assert LLM(str(out)).engine.model.layers[0].mlp.down.weight.dtype == torch.int8
