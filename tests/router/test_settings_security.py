"""Secrets travel to workers (Ray actor arguments, EP follower processes) as file paths,
never as values; the worker reads them on its own node, and a worker that an authenticating
router started refuses to run without a secret instead of serving unauthenticated."""

from __future__ import annotations

import pytest

from engine.security import ENV_FILE, ENV_VALUE, ClusterSecret
from router.launch.settings import WorkerSettings
from router.state.redis_conn import RedisOptions

VALUE = "s3cret-value-0123456789abcdef"


@pytest.fixture
def no_env(monkeypatch):
    for key in (ENV_FILE, ENV_VALUE):
        monkeypatch.delenv(key, raising=False)


def test_security_settings_carry_paths_not_values(tmp_path, no_env):
    (tmp_path / "secret").write_text(VALUE)
    (tmp_path / "pw").write_text("redis-" + VALUE)
    settings = WorkerSettings(
        model="m",
        cluster_secret_file=str(tmp_path / "secret"),
        cluster_auth=True,
        redis_url="redis://r:6379/0",
        redis_options=RedisOptions(password_file=str(tmp_path / "pw")),
    )
    text = settings.to_json()  # what Ray's actor arguments hold
    assert VALUE not in text and str(tmp_path / "secret") in text
    again = WorkerSettings.from_json(text)
    assert again == settings
    config = again.worker_config("decode", "d0", "127.0.0.1")
    assert config.secret == ClusterSecret(VALUE.encode())
    assert config.redis == RedisOptions(password_file=str(tmp_path / "pw"))
    assert VALUE not in repr(config)


def test_security_worker_without_the_secret_refuses_to_start(tmp_path, no_env, monkeypatch):
    with pytest.raises(ValueError, match=r"authenticates with a cluster secret but the worker .* has none"):  # fmt: skip
        WorkerSettings(model="m", cluster_auth=True).worker_config("decode", "d0", "127.0.0.1")
    assert WorkerSettings(model="m").worker_config("decode", "d0", "h").secret is None  # laptop
    monkeypatch.setenv(ENV_VALUE, VALUE)  # the node's own environment (inherited by Ray workers)
    config = WorkerSettings(model="m", cluster_auth=True).worker_config("decode", "d0", "h")
    assert config.secret == ClusterSecret(VALUE.encode())
