"""Placeholders (data paths only) and the validation of saga templates in the config file."""

from __future__ import annotations

import pytest

from config.loader import ConfigInvalid, load_text
from saga.template import TemplateError, placeholders, quote_path_value, render_text, render_value

SCOPE = {
    "input": {"sku": "A1", "amount": 10, "tags": ["a", "b"], "nested": {"ok": True}},
    "saga": {"id": "order-42"},
    "steps": {
        "reserve": {"response": {"status": 201, "headers": {"location": "/r/7"}, "body": {"id": 7, "items": [{"n": 3}]}}},
    },
}


def test_a_sole_placeholder_keeps_its_json_type() -> None:
    body = {
        "amount": "{{input.amount}}", "tags": "{{ input.tags }}", "nested": "{{input.nested}}",
        "status": "{{steps.reserve.response.status}}", "first": "{{steps.reserve.response.body.items.0.n}}",
        "whole": "{{steps.reserve.response.body}}", "list": ["{{saga.id}}", 1, None],
    }
    assert render_value(body, SCOPE) == {
        "amount": 10, "tags": ["a", "b"], "nested": {"ok": True}, "status": 201, "first": 3,
        "whole": {"id": 7, "items": [{"n": 3}]}, "list": ["order-42", 1, None],
    }


def test_placeholders_inside_text_are_written_as_text_or_json() -> None:
    assert render_text("{{saga.id}}/{{input.amount}}/{{input.tags}}", SCOPE) == 'order-42/10/["a","b"]'
    assert render_value("n={{input.nested}}", SCOPE) == 'n={"ok":true}'
    assert render_text("{{steps.reserve.response.headers.Location}}", SCOPE) == "/r/7"


def test_path_values_are_percent_encoded() -> None:
    scope = {"input": {"id": "a/b?c=d e"}, "saga": {"id": "s"}, "steps": {}}
    assert render_text("/x/{{input.id}}", scope, escape=quote_path_value) == "/x/a%2Fb%3Fc%3Dd%20e"


@pytest.mark.parametrize(
    "text",
    ["{{input.missing}}", "{{steps.charge.response.body.id}}", "{{steps.reserve.response.body.items.5.n}}",
     "{{steps.reserve.response.headers.etag}}", "{{input.sku.deeper}}"],
)
def test_an_unresolved_placeholder_is_a_template_error(text: str) -> None:
    with pytest.raises(TemplateError):
        render_value({"x": text}, SCOPE)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{{input.sku", "unbalanced"),
        ("{{ }}", "malformed"),
        ("{{env.HOME}}", "unknown placeholder"),
        ("{{saga.name}}", "only saga.id"),
        ("{{steps.a.body}}", "malformed"),
        ("{{steps.a.response.status.x}}", "status has no fields"),
        ("{{steps.a.response.headers}}", "name one header"),
        ("{{input.__class__()}}", "malformed"),
    ],
)
def test_malformed_placeholders_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        placeholders(text)


CONFIG = """
version: 1
routes:
  - name: inventory
    upstream: http://127.0.0.1:9
sagas:
  place-order:
    deadline: 1m
    steps:
      - name: reserve
        action: {route: inventory, path: /r}
        compensation: {route: inventory, method: DELETE, path: "/r/{{steps.reserve.response.body.id}}"}
      - name: charge
        action: {route: payments, path: "/p/{{steps.ship.response.body.id}}"}
      - name: reserve
        action: {route: inventory, path: /r}
        timeout: forever
"""


def test_config_templates_are_validated_with_locations() -> None:
    with pytest.raises(ConfigInvalid) as caught:
        load_text(CONFIG)
    errors = [str(e) for e in caught.value.errors]
    assert errors == ["sagas.place-order.steps[2].timeout: invalid duration 'forever': use e.g. '250ms', '2s', '1m', '1h'"]

    with pytest.raises(ConfigInvalid) as caught:
        load_text(CONFIG.replace("timeout: forever", "timeout: 2s"))
    assert sorted(str(e) for e in caught.value.errors) == [
        "sagas.place-order.steps[1].action.path: placeholder names an unknown step 'ship'",
        "sagas.place-order.steps[1].action.route: unknown route 'payments'",
        "sagas.place-order.steps[2].name: duplicate step name 'reserve' (first at steps[0])",
    ]


def test_a_valid_template_loads() -> None:
    text = CONFIG.replace("timeout: forever", "timeout: 2s").replace("route: payments", "route: inventory")
    text = text.replace("steps.ship.", "steps.reserve.").replace("      - name: reserve\n        action: {route: inventory, path: /r}\n        timeout: 2s\n", "")
    loaded = load_text(text)
    template = loaded.config.sagas["place-order"]
    assert [s.name for s in template.steps] == ["reserve", "charge"]
    assert template.deadline == 60.0 and template.on_recovery == "compensate"
    assert template.compensation_retry.attempts == 10


def test_a_template_body_holding_infinity_or_nan_is_refused() -> None:
    # (JSON has neither: GET /config would answer invalid JSON, and participants would get it)
    text = """
routes: [{name: inventory, upstream: http://x}]
sagas:
  s:
    steps:
      - name: a
        action: {route: inventory, body: {limit: .inf, ratio: [1, .nan]}}
"""
    with pytest.raises(ConfigInvalid) as caught:
        load_text(text)
    assert [str(e) for e in caught.value.errors] == [
        "sagas.s.steps[0].action.body: limit: .inf or .nan, which JSON has no form for",
    ]
