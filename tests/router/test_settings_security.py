"""Secrets travel to workers (Ray actor arguments, EP follower processes) as file paths,
never as values: the whole ``WorkerConfig`` is serialised, a secret value in it
(``TransferConfig.secret``) never is; the worker reads the files on its own node, and a
worker that an authenticating router started refuses to run without a secret instead of
serving unauthenticated."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, RedisOptions, StateConfig, TransferConfig, WorkerConfig
from engine.config.tree import from_json, to_json
from engine.security import ENV_FILE, ENV_VALUE, ClusterSecret
from engine.worker.host import worker_secret

VALUE = "s3cret-value-0123456789abcdef"


@pytest.fixture
def no_env(monkeypatch):
    for key in (ENV_FILE, ENV_VALUE):
        monkeypatch.delenv(key, raising=False)


def _config(**kw) -> WorkerConfig:
    return WorkerConfig("decode", EngineConfig("m"), **kw)


def test_security_config_carries_paths_not_values(tmp_path, no_env):
    (tmp_path / "secret").write_text(VALUE)
    (tmp_path / "pw").write_text("redis-" + VALUE)
    state = StateConfig("redis://r:6379/0", redis=RedisOptions(password_file=str(tmp_path / "pw")))  # fmt: skip
    config = _config(
        cluster_secret_file=str(tmp_path / "secret"),
        cluster_auth=True,
        state=state,
        transfer=TransferConfig(secret=ClusterSecret(VALUE.encode())),  # filled on a node
    )
    text = to_json(config)  # what Ray's actor arguments hold
    assert VALUE not in text and str(tmp_path / "secret") in text
    again = from_json(WorkerConfig, text)
    assert again.transfer.secret is None and again == _config(
        cluster_secret_file=str(tmp_path / "secret"), cluster_auth=True, state=state
    )
    assert worker_secret(again) == ClusterSecret(VALUE.encode())
    assert VALUE not in repr(again) and VALUE not in repr(config)


def test_security_worker_without_the_secret_refuses_to_start(no_env, monkeypatch):
    with pytest.raises(ValueError, match=r"authenticates with a cluster secret but the worker .* has none"):  # fmt: skip
        worker_secret(_config(cluster_auth=True))
    assert worker_secret(_config()) is None  # a laptop
    monkeypatch.setenv(ENV_VALUE, VALUE)  # the node's own environment (inherited by Ray workers)
    assert worker_secret(_config(cluster_auth=True)) == ClusterSecret(VALUE.encode())
