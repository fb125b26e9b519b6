"""The Redis cluster state's credentials (router/state/redis_conn.py) against real redis-servers
with ``requirepass`` and TLS: the password from a file or the environment, never shown
(``/health``'s state dict, logs, errors); and malformed ``workers`` / ``load`` entries that
anyone with Redis access could write are skipped, not raised into every request."""

from __future__ import annotations

import logging
import uuid

import pytest

from router.state.redis import RedisClusterState
from router.state.redis_conn import ENV_PASSWORD, RedisOptions, client_kwargs, redact_url
from tests.redis_server import RedisServer
from tests.router.test_redis_state import rec

PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def locked():
    s = RedisServer(password=PASSWORD).start()
    yield s
    s.close()


def test_security_redact_url():
    assert redact_url(f"redis://:{PASSWORD}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url(f"rediss://app:{PASSWORD}@h:6380/1") == "rediss://app:***@h:6380/1"
    assert redact_url("redis://app@h:6379/0") == "redis://app@h:6379/0"  # a user is no secret
    assert redact_url(f"redis://h:6379/0?password={PASSWORD}&db=2") == "redis://h:6379/0?password=***&db=2"  # fmt: skip
    assert PASSWORD not in redact_url(f"redis://[::1:{PASSWORD}@x")


def test_security_password_from_a_file_or_the_environment(locked, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)
    bare = RedisClusterState(locked.url, prefix="bare")
    bare.register(rec("d0"))  # refused: NOAUTH -> RedisDown, kept locally
    assert bare.health() == {"backend": "redis", "url": locked.url, "connected": False}
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    by_file = RedisClusterState(locked.url, prefix="f", options=RedisOptions(password_file=str(tmp_path / "pw")))  # fmt: skip
    by_file.register(rec("d0"))
    assert by_file.health()["connected"] and [w.worker_id for w in by_file.workers()] == ["d0"]
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    by_env = RedisClusterState(locked.url, prefix="f")
    assert [w.worker_id for w in by_env.workers()] == ["d0"]
    in_url = locked.url.replace("://", f"://:{PASSWORD}@")
    monkeypatch.delenv(ENV_PASSWORD)
    shown = RedisClusterState(in_url, prefix="f")
    assert [w.worker_id for w in shown.workers()] == ["d0"]
    assert PASSWORD not in str(shown.health()) and "***" in shown.health()["url"]
    locked.stop()
    try:
        shown.workers()  # unreachable: logged with the URL
    finally:
        locked.start()
    assert "unreachable" in caplog.text and PASSWORD not in caplog.text


def test_security_password_in_url_and_file_conflict(tmp_path):
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ValueError, match=r"has a password and a password file.*keep one"):
        client_kwargs(RedisOptions(password_file=str(tmp_path / "pw")), "redis://:y@h:1/0")
    with pytest.raises(ValueError, match=r"need a TLS URL \(rediss://"):
        client_kwargs(RedisOptions(ca_file=str(tmp_path / "pw")), "redis://h:1/0")
    with pytest.raises(ValueError, match="cannot read the Redis password file"):
        client_kwargs(RedisOptions(password_file=str(tmp_path / "missing")), "redis://h:1/0")


def test_security_tls_with_a_ca_file(tmp_path):
    server = RedisServer(password=PASSWORD, tls=True).start()
    try:
        (tmp_path / "pw").write_text(PASSWORD)
        ca = str(server.tls_files["ca"])
        state = RedisClusterState(server.url, prefix="tls", options=RedisOptions(password_file=str(tmp_path / "pw"), ca_file=ca))  # fmt: skip
        state.register(rec("d0"))
        assert state.health()["connected"] and [w.worker_id for w in state.workers()] == ["d0"]
        untrusted = RedisClusterState(server.url, prefix="tls", options=RedisOptions(password_file=str(tmp_path / "pw")))  # fmt: skip
        untrusted.workers()  # self-signed CA not in the system's store: refused
        assert untrusted.health()["connected"] is False
        plain = RedisClusterState(server.url.replace("rediss", "redis"), prefix="tls", options=RedisOptions(password_file=str(tmp_path / "pw")))  # fmt: skip
        plain.workers()
        assert plain.health()["connected"] is False
    finally:
        server.close()


@pytest.mark.parametrize(
    "junk",
    ["not json", "[1, 2]", '{"role": "decode"}', '{"role": "admin", "epoch": 1}', "null",
     '{"worker_id": "x", "role": "decode", "address": "a", "layout": 5, "num_blocks": 1, '
     '"max_model_len": 1, "epoch": 1, "hostname": "", "kv_transports": []}'],
)  # fmt: skip
def test_security_malformed_workers_entries_are_skipped(locked, junk, caplog, tmp_path):
    prefix = f"m{uuid.uuid4().hex[:8]}"
    (tmp_path / "pw").write_text(PASSWORD)
    state = RedisClusterState(locked.url, prefix=prefix, options=RedisOptions(str(tmp_path / "pw")))  # fmt: skip
    state.register(rec("d0"))
    raw = locked.client()
    raw.hset(f"{prefix}:workers", "evil", junk)
    raw.hset(f"{prefix}:load", "d0", "{broken")
    with caplog.at_level(logging.ERROR, logger="router.state.records"):
        for _ in range(3):
            assert [w.worker_id for w in state.workers()] == ["d0"]
            assert state.get("d0").load.num_free_blocks == 0  # unreadable load = unknown
    assert state.health()["connected"] is True  # not mistaken for Redis being down
    logged = [r.getMessage() for r in caplog.records]
    assert len([m for m in logged if "'evil'" in m]) == 1, logged  # once, not per read
