"""Header names, values and methods from the config: refused with their place unless HTTP allows them."""

from __future__ import annotations

import asyncio
import textwrap
from types import SimpleNamespace

import pytest

from bench.procs import free_port
from config.loader import ConfigInvalid, load_text
from policies.fallback import FallbackPolicy
from proxy.cli import main
from proxy.observer import NullObserver

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def fallback_config(headers: str) -> str:
    return textwrap.dedent(f"""
        routes:
          - name: r
            upstream: http://127.0.0.1:9
            chain:
              - fallback: {{on: [5xx], status: 200, headers: {headers}, body: fb}}
    """)


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        load_text(text)
    return [str(e) for e in caught.value.errors]


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        (r'{"X-A": "a\r\nSet-Cookie: evil=1"}', "'X-A'"),
        (r'{"X-A": "a\nb"}', "'X-A'"),
        (r'{"X-A": "a\0b"}', "'X-A'"),
        (r'{"X-A": "a\x01b"}', "'X-A'"),
        (r'{"X-A": "a\x7fb"}', "'X-A'"),
        ('{"Bad Name": v}', "'Bad Name'"),
        ('{"": v}', "''"),
        ('{"X-A:": v}', "'X-A:'"),
        (r'{"X-A\r\nSet-Cookie": v}', r"'X-A\r\nSet-Cookie'"),
        ('{"Caf\u00e9": v}', "'Caf\u00e9'"),
    ],
)
def test_fallback_headers_that_http_forbids_are_located_errors(headers, named):
    [issue] = issues(fallback_config(headers))
    loc, _, msg = issue.partition(": ")
    assert loc == "routes[0].chain[0].fallback.headers"
    assert named in msg
    assert "\r" not in issue and "\n" not in issue  # one line, whatever the config held


@pytest.mark.parametrize("name", ["Transfer-Encoding", "transfer-encoding"])
def test_a_fallback_cannot_set_transfer_encoding(name):
    # (Fender frames the body with Content-Length; a chunked coding beside it desyncs the client)
    [issue] = issues(fallback_config(f"{{{name}: chunked}}"))
    assert issue.startswith("routes[0].chain[0].fallback.headers: Transfer-Encoding")


def test_a_header_value_is_never_repeated_in_the_error():
    # (errors are shown by the admin API; a header value may be a credential)
    [issue] = issues(fallback_config(r'{"X-Token": "s3cret\n"}'))
    assert "s3cret" not in issue


def test_every_token_character_tab_and_non_ascii_values_are_accepted():
    loaded = load_text(fallback_config(f'{{"{TCHARS}": "a\\tb caf\u00e9 !\\"#~", x-empty: ""}}'))
    [item] = loaded.config.routes[0].chain or ()
    assert not isinstance(item, str) and item.fallback is not None
    assert item.fallback.headers[TCHARS] == 'a\tb caf\u00e9 !"#~'


def test_a_shared_fallback_is_located_under_its_name():
    [issue] = issues("""
        policies:
          fb: {fallback: {headers: {"Bad Name": v}}}
        routes: []
    """)
    assert issue.startswith("policies.fb.fallback.headers: ")


def test_fender_check_prints_the_located_error(tmp_path, capsys):
    path = tmp_path / "fender.yaml"
    path.write_text(fallback_config(r'{"X-A": "a\r\nSet-Cookie: evil=1", "Bad Name": "v"}'))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("routes[0].chain[0].fallback.headers: ") for line in out)


async def test_reload_refuses_bad_fallback_headers_and_keeps_the_last_good_config(start_fender):
    fender = await start_fender(fallback_config('{"X-A": "a"}'))
    fender.config_path.write_text(fallback_config(r'{"X-A": "a\r\nSet-Cookie: evil=1"}'))
    result = await fender.app.reload("api")
    assert not result.ok
    assert [e.loc for e in result.errors] == ["routes[0].chain[0].fallback.headers"]


async def test_a_fallback_that_cannot_be_written_is_recorded_as_the_500_the_client_got(
    start_fender, http, monkeypatch
):
    # (config validation keeps such headers out; a policy built another way must still be counted
    # as what the client saw, not as the fallback's 200, and as Fender's failure)
    recorded: list[tuple[int, str]] = []

    def request_finished(self, ctx, method, path, status, outcome, duration):
        recorded.append((status, outcome))

    monkeypatch.setattr(NullObserver, "request_finished", request_finished)
    fallback = FallbackPolicy(on=["upstream_unavailable"], headers={"X-A": "a\r\nSet-Cookie: evil=1"}, body="fb")

    class Factory:
        def build(self, config):
            return {r.name: SimpleNamespace(policies=[("fallback", fallback)], buffer_limit=0)
                    for r in config.routes}

    fender = await start_fender(f"routes: [{{name: r, upstream: 'http://127.0.0.1:{free_port()}'}}]",
                                factory=Factory())
    async with http.get(fender.proxy_url + "/", headers={"Host": "x"}) as resp:
        assert resp.status == 500
        assert "set-cookie" not in resp.headers
    assert recorded == [(500, "internal_error")]  # (what happened: Fender failed to answer)


@pytest.mark.parametrize(
    ("headers", "named"),
    [('{"x tenant": acme}', "'x tenant'"), (r'{x-tenant: "acme\r\n"}', "'x-tenant'"), ('{"": a}', "''")],
)
def test_match_headers_that_no_request_can_carry_are_located_errors(headers, named):
    # (the parser refuses such requests, so the route could never match)
    [issue] = issues(f"routes: [{{name: r, upstream: 'http://127.0.0.1:9', match: {{headers: {headers}}}}}]")
    loc, _, msg = issue.partition(": ")
    assert loc == "routes[0].match.headers"
    assert named in msg


def test_match_headers_still_ignore_case_in_names():
    loaded = load_text("routes: [{name: r, upstream: 'http://127.0.0.1:9', match: {headers: {X-Tenant: 'a\tb'}}}]")
    assert loaded.config.routes[0].match.headers == {"x-tenant": "a\tb"}


def methods_config(methods: str, *, retry: bool = False) -> str:
    """A route that lists `methods` (a YAML sequence) in `match`, or in its retry when `retry`."""
    where = f"chain: [{{retry: {{methods: {methods}}}}}]" if retry else f"match: {{methods: {methods}}}"
    return f"routes: [{{name: r, upstream: 'http://127.0.0.1:9', {where}}}]"


@pytest.mark.parametrize(("retry", "loc"), [(False, "routes[0].match.methods"), (True, "routes[0].chain[0].retry.methods")])
@pytest.mark.parametrize(("method", "shown"), [('"B AD"', "'B AD'"), ('""', "''"), ('"GET\\r\\n"', r"'GET\r\n'"),
                                               ('"GET\\x01"', r"'GET\x01'"), ('"G(ET)"', "'G(ET)'"),
                                               ('"GÉT"', "'GÉT'")])
def test_a_method_that_is_not_an_http_token_is_a_located_error(method, shown, retry, loc):
    [issue] = issues(methods_config(f"[GET, {method}]", retry=retry))
    place, _, msg = issue.partition(": ")
    assert place == loc
    assert shown in msg
    assert "\r" not in issue and "\n" not in issue  # one line, whatever the config held


def test_fender_check_prints_a_bad_retry_method_with_its_place(tmp_path, capsys):
    path = tmp_path / "fender.yaml"
    path.write_text(methods_config('["GE T"]', retry=True))
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "routes[0].chain[0].retry.methods: method 'GE T' is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)"
    ]


def test_retry_methods_are_upper_cased():
    loaded = load_text(methods_config("[get, purge]", retry=True))
    [item] = loaded.config.routes[0].chain or ()
    assert not isinstance(item, str) and item.retry is not None
    assert item.retry.methods == ("GET", "PURGE")


def test_any_method_the_parser_knows_is_a_method():
    # (methods are extensible: PURGE, M-SEARCH and the like are legal)
    loaded = load_text(methods_config("[get, PURGE, M-SEARCH, propfind]"))
    assert loaded.config.routes[0].match.methods == ("GET", "PURGE", "M-SEARCH", "PROPFIND")


def test_a_method_the_parser_answers_400_is_a_located_error():
    # (a token, but llhttp knows a fixed list of methods: a GETT request never reaches routing)
    [issue] = issues(methods_config("[GET, GETT]"))
    place, _, msg = issue.partition(": ")
    assert place == "routes[0].match.methods"
    assert msg.startswith("method 'GETT' never reaches a route")


def test_a_retry_method_may_be_one_that_never_arrives():
    # (it is never retried, which is harmless: only a route that can never match is an error)
    load_text(methods_config("[GET, GETT]", retry=True))


def test_fender_check_prints_a_method_that_never_arrives(tmp_path, capsys):
    path = tmp_path / "fender.yaml"
    path.write_text(methods_config("[GETT]"))
    assert main(["check", str(path)]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("routes[0].match.methods: method 'GETT' never reaches a route")


async def test_reload_refuses_a_method_that_never_arrives(start_fender):
    fender = await start_fender(methods_config("[GET]"))
    fender.config_path.write_text(methods_config("[GETT]"))
    result = await fender.app.reload("api")
    assert not result.ok
    assert [e.loc for e in result.errors] == ["routes[0].match.methods"]


@pytest.mark.parametrize("method", ["PURGE", "M-SEARCH", "QUERY", "GETT", "BREW", "PRI"])
async def test_the_config_refuses_the_methods_the_proxy_listener_answers_400(start_fender, method):
    fender = await start_fender(f"routes: [{{name: r, upstream: 'http://127.0.0.1:{free_port()}'}}]")
    reader, writer = await asyncio.open_connection(*fender.app.addresses["proxy"])
    writer.write(f"{method} / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    async with asyncio.timeout(5):
        status = int((await reader.readline()).split()[1])
    writer.close()
    try:
        load_text(methods_config(f"[{method}]"))
    except ConfigInvalid:
        assert status == 400
    else:
        assert status != 400


@pytest.mark.parametrize("status", [100, 101, 199])
def test_a_fallback_status_is_a_final_one(status):
    # (a 1xx is interim: the client would go on waiting for the answer)
    found = issues(fallback_config("{}").replace("status: 200", f"status: {status}"))
    assert found and all(line.startswith("routes[0].chain[0].fallback.status") for line in found)

