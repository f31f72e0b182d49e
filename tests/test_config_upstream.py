"""Upstream URLs and TLS server names from the config: refused with their place unless they name a host."""

from __future__ import annotations

import pytest

from config.loader import ConfigInvalid, load_text
from proxy.cli import main


def route(upstream: str) -> str:
    return f"routes: [{{name: r, upstream: {upstream}}}]"


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        load_text(text)
    return [str(e) for e in caught.value.errors]


@pytest.mark.parametrize(
    "url",
    [r"http://exa\tmple.com", r"http://exa\nmple.com", r"http://example.com\r\n", r"http://exa\0mple.com",
     r"http://exa\x7fmple.com", "http://exa mple.com:8080", r"http://exa\u00a0mple.com",
     r"https://user:s3cret@exa\x01mple.com"],
)
def test_an_upstream_url_with_whitespace_or_a_control_character_is_a_located_error(url):
    [issue] = issues(route(f'"{url}"'))
    assert issue == "routes[0].upstream.url: an upstream URL holds no whitespace or control character"


@pytest.mark.parametrize(("url", "shown"), [("http://exa$mple.com", "'exa$mple.com'"), ("http://a..b", "'a..b'"),
                                            (f"http://{'a' * 64}.example", f"'{'a' * 64}.example'")])
def test_an_upstream_host_that_is_no_host_name_is_a_located_error(url, shown):
    [issue] = issues(route(f"{{url: '{url}'}}"))
    assert issue == f"routes[0].upstream.url: the upstream host {shown} is not a host name or an IP address"


@pytest.mark.parametrize(
    "url",
    ["http://payments.internal:8080", "http://[::1]:8080", "http://[fe80::1%25eth0]:8080", "https://127.0.0.1",
     "https://bücher.example:8443/base", "http://upstream_1", "http://localhost.", "http://user:pa%20ss@h:81"],
)
def test_ip_literals_idna_names_and_ports_are_upstream_hosts(url):
    assert load_text(route(f"'{url}'")).config.routes[0].upstream.url == url


@pytest.mark.parametrize(
    ("name", "shown"),
    [(r'"exa\tmple.com"', r"'exa\tmple.com'"), (r'"example.com\n"', r"'example.com\n'"), ('"exa mple"', "'exa mple'"),
     ('"example.com:443"', "'example.com:443'"), ('"[::1]"', "'[::1]'"), ('""', "''"), ('"*.example"', "'*.example'")],
)
def test_a_tls_server_name_that_is_no_host_name_is_a_located_error(name, shown):
    [issue] = issues(route(f"{{url: 'https://10.0.0.1', tls: {{server_name: {name}}}}}"))
    assert issue == f"routes[0].upstream.tls.server_name: server_name {shown} is not a host name or an IP address"
    assert "\n" not in issue  # one line, whatever the config held


@pytest.mark.parametrize("name", ["payments.internal", "bücher.example", "::1", "10.0.0.1", "localhost"])
def test_host_names_idna_names_and_ip_addresses_are_server_names(name):
    loaded = load_text(route(f"{{url: 'https://10.0.0.1', tls: {{server_name: '{name}'}}}}"))
    assert loaded.config.routes[0].upstream.tls.server_name == name


def test_fender_check_prints_the_located_error(tmp_path, capsys):
    path = tmp_path / "fender.yaml"
    path.write_text(route(r'{url: "https://10.0.0.1", tls: {server_name: "pay\tments"}}'))
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        r"routes[0].upstream.tls.server_name: server_name 'pay\tments' is not a host name or an IP address"
    ]


@pytest.mark.parametrize("url", ["https://xK9+Qz/4TmS=@api.example.com", "https://to$ken/x@api.example.com"])
def test_a_host_that_is_the_start_of_an_unescaped_credential_is_not_quoted(url):
    # (a token with a / in the userinfo ends urlsplit's authority early: what it calls the host is
    # the token's start, and errors are shown by fender check, the log and GET /config)
    [issue] = issues(route(f"'{url}'"))
    assert issue == "routes[0].upstream.url: the upstream host is not a host name or an IP address"


def test_a_ca_file_that_holds_no_certificate_is_a_located_error(tmp_path, capsys):
    # (fender check said ok, and fender run refused the same file)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not a certificate\n")
    path = tmp_path / "fender.yaml"
    path.write_text(route(f"{{url: 'https://10.0.0.1', tls: {{ca_file: '{ca_file}'}}}}"))
    assert main(["check", str(path)]) == 1
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"routes[0].upstream.tls.ca_file: {ca_file} holds no CA certificate")


def test_a_ca_file_is_parsed_once_not_per_route_and_validation(tmp_path, monkeypatch):
    # (a CA bundle takes some 30 ms to parse, and a reload validates on the event loop: parsed per
    # route and per reload, twenty routes sharing one bundle stalled the data plane for 0.7 s)
    import config.loader

    ca_file = tmp_path / "bundle.pem"
    ca_file.write_text("a bundle")
    parsed: list[str] = []
    monkeypatch.setattr(config.loader.ssl, "create_default_context", lambda cafile: parsed.append(cafile))
    text = "routes: [" + ", ".join(
        f"{{name: r{i}, upstream: {{url: 'https://h{i}', tls: {{ca_file: '{ca_file}'}}}}}}" for i in range(3)) + "]"
    load_text(text)
    load_text(text)
    assert parsed == [str(ca_file)]
    ca_file.write_text("a bundle, renewed")  # (a changed file is parsed again)
    load_text(text)
    assert parsed == [str(ca_file)] * 2
