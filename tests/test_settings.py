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
    ("FENDER_LOG_LEVEL", "verbose", "log level is one of"),
])
def test_a_bad_setting_is_named_and_fender_exits_1_before_starting(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    # (a config that is not there: were the setting let through, Fender would stop there, not serve)
    assert main(["run", "--config", "/nonexistent/fender.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: ") and message in err
    assert "Traceback" not in err and "s3cret" not in err  # (a store URL may hold a password)


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
