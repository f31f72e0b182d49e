"""FENDER_* settings (SPEC section 3): a bad value is one located line and exit 1, never a traceback."""

from __future__ import annotations

import pytest

from config.settings import Settings
from proxy.cli import main


@pytest.mark.parametrize(("name", "value", "message"), [
    ("FENDER_PROXY_ADDR", "nonsense", "listener address 'nonsense' must be HOST:PORT"),
    ("FENDER_ADMIN_ADDR", "127.0.0.1:99999", "listener address '127.0.0.1:99999' must be HOST:PORT"),
    ("FENDER_METRICS_ADDR", "localhost", "listener address 'localhost' must be HOST:PORT"),
    ("FENDER_SAGA_STORE", "mysql://app:s3cret@db/app", "unsupported scheme 'mysql'"),
    ("FENDER_SAGA_STORE", "postgresql://app:s3cret@db/app?schema=Bad-Name", "schema 'Bad-Name': use lower-case"),
    ("FENDER_SAGA_STORE", "postgresql://app:s3cret@db/app?lease=abc", "lease: invalid duration 'abc'"),
    ("FENDER_SAGA_STORE", "postgresql://app:s3cret@db/app?lease=0.1s", "the saga lease must be at least 0.5s"),
    ("FENDER_LOG_LEVEL", "verbose", "log level is one of"),
    ("FENDER_REDIS_URL", "http://127.0.0.1:6379", "must specify one of the following schemes (redis://, rediss://"),
    ("FENDER_REDIS_URL", "redis://127.0.0.1:notaport/0", "Port could not be cast to integer value as 'notaport'"),
    ("FENDER_REDIS_URL", "redis://:s3cret@127.0.0.1:99999/0", "Port out of range"),
    ("FENDER_REDIS_URL", "redis://:pa/s3cret@127.0.0.1/0", "use redis://"),  # a '/' in the password
    ("FENDER_REDIS_URL", "redis://:s3cret#x@127.0.0.1:6379/0", "use redis://"),  # a '#' in the password
    ("FENDER_REDIS_URL", "redis://u:s3cret?x@127.0.0.1:6379/0", "use redis://"),  # a '?' in the password
    # (the password's one-letter pieces masked letters of the message: "c***st to integer v***lue")
    ("FENDER_REDIS_URL", "redis://:s3cret#a@127.0.0.1:6379/0", "Port could not be cast to integer value as '***'"),
    ("FENDER_REDIS_URL", "redis://:e/s3cret@127.0.0.1/0", "Port could not be cast to integer value as '***'"),
    ("FENDER_REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
])
def test_a_bad_setting_is_named_and_fender_exits_1_before_starting(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    # (a config that is not there: were the setting let through, Fender would stop there, not serve)
    assert main(["run", "--config", "/nonexistent/fender.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: ") and message in err
    assert "Traceback" not in err and "s3cret" not in err  # (a store URL may hold a password)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "redis://:s3cret@redis:6379/2?key_prefix=app:rl:", "rediss://redis.internal",
    "unix:///run/redis.sock?db=1",
])
def test_redis_urls_in_every_form_redis_py_takes_are_accepted(monkeypatch, url):
    monkeypatch.setenv("FENDER_REDIS_URL", url)
    assert Settings().redis_url == url


@pytest.mark.parametrize("addr", ["127.0.0.1:15001", "[::1]:15001", ":15001", "0.0.0.0:0"])
def test_listener_addresses_in_every_documented_form_are_accepted(monkeypatch, addr):
    monkeypatch.setenv("FENDER_PROXY_ADDR", addr)
    assert Settings().proxy_addr == addr


@pytest.mark.parametrize(("value", "seconds"), [("3", 3.0), ("2.5", 2.5), ("500ms", 0.5), ("1m", 60.0)])
def test_a_duration_setting_may_be_a_plain_number_of_seconds(monkeypatch, value, seconds):
    # (SPEC: durations are strings or numbers of seconds, and an environment variable is a string)
    monkeypatch.setenv("FENDER_DRAIN_TIMEOUT", value)
    assert Settings().drain_timeout == seconds


@pytest.mark.parametrize(("value", "level"), [("warn", "warning"), ("WARNING", "warning"), ("fatal", "critical")])
def test_log_levels_take_the_usual_aliases(monkeypatch, value, level):
    monkeypatch.setenv("FENDER_LOG_LEVEL", value)
    assert Settings().log_level == level
