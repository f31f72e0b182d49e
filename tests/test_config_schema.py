"""`fender schema`: a JSON Schema that accepts what `fender check` accepts, shorthands included."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from config.loader import YamlLoader, load_text
from proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent

SHORTHANDS = """
version: 1
defaults:
  chain: [{timeout: 10s}]
policies:
  payments-breaker: {circuit_breaker: {consecutive_failures: 5, open_for: 30s}}
routes:
  - name: payments
    match: {host: payments.internal, path_prefix: /v1}
    upstream: http://payments.internal:8080
    chain:
      - rate_limit: {rate: 50/s, burst: 20}
      - timeout: 5s
      - retry:
      - retry: {attempts: 3, on: [5xx, timeout]}
      - payments-breaker
      - timeout: {duration: 1500ms}
  - name: ledger
    upstream: {url: "https://ledger.internal", tls: {verify: false}}
"""


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["schema"]) == 0
    schema = json.loads(out.getvalue())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, text: str) -> list[str]:
    raw = yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader (YAML 1.2 booleans: `on` is a key)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)]


def test_the_schema_accepts_the_shorthands_fender_check_accepts(validator):
    load_text(SHORTHANDS)  # (fender check's own validation: raises if the file is bad)
    assert _errors(validator, SHORTHANDS) == []


@pytest.mark.parametrize("path", ["config/fender.yaml", "bench/configs/fender.yaml"])
def test_the_schema_accepts_the_configs_fender_ships(validator, path):
    text = (ROOT / path).read_text().replace("$upstream_port", "8080")
    load_text(text)
    assert _errors(validator, text) == []


@pytest.mark.parametrize("bad", [
    "routes: [{name: r, upstream: 42}]",
    "routes: [{name: r, upstream: http://x, chain: [{timeout: [5s]}]}]",
    "routes: [{name: r, upstream: {url: http://x, retries: 3}}]",
])
def test_the_schema_still_rejects_what_is_not_a_config(validator, bad):
    assert _errors(validator, bad)
