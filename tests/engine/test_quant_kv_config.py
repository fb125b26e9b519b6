"""``--kv-cache-dtype``: one config-tree field reaching both workers of ``pdserve serve``,
``pdserve worker`` and the Helm chart; a bad value is refused naming the choices."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig
from router.launch.cli import build_parser
from router.launch.flags import serve_config, worker_config
from tests.deploy.serve_flags import serve_config_of
from tests.deploy.test_helm_chart import render, router_container


def test_quant_kv_flag_reaches_both_workers_of_serve_and_a_worker():
    cfg = serve_config(build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"]))
    assert cfg.prefill.engine.cache.kv_cache_dtype == cfg.decode.engine.cache.kv_cache_dtype == "int8"  # fmt: skip
    argv = ["worker", "--role", "decode", "--kv-cache-dtype", "fp8_e5m2"]
    assert worker_config(build_parser().parse_args(argv)).engine.cache.kv_cache_dtype == "fp8_e5m2"
    default = serve_config(build_parser().parse_args(["serve"]))
    assert default.decode.engine.cache.kv_cache_dtype == "auto"


def test_quant_kv_bad_dtype_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "fp4"])
    assert "fp8_e4m3" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'fp4' is not supported; choose one of"):
        CacheConfig(kv_cache_dtype="fp4")


def test_quant_kv_helm_value_sets_the_flag():
    args = router_container(render({"engine": {"kvCacheDtype": "fp8_e4m3"}}))["args"]
    assert "--kv-cache-dtype=fp8_e4m3" in args
    assert serve_config_of(args).prefill.engine.cache.kv_cache_dtype == "fp8_e4m3"
    assert "--kv-cache-dtype=auto" in router_container(render(None))["args"]
