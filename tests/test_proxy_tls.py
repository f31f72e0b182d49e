"""https:// upstreams: Fender originates TLS, verifying against the route's CA file."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import pytest
from aiohttp import web

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, cert


async def tls_upstream(aiohttp_server, certificate):
    key, cert = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"secure": request.secure, "path": request.path})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return await aiohttp_server(app, ssl=context)


async def test_https_upstream_verified_with_ca_file(aiohttp_server, start_fender, http, certificate):
    server = await tls_upstream(aiohttp_server, certificate)
    _, cert = certificate
    fender = await start_fender(f"""
        routes:
          - name: secure
            match: {{host: secure}}
            upstream: {{url: "https://localhost:{server.port}", tls: {{ca_file: "{cert}"}}}}
          - name: unverified
            match: {{host: unverified}}
            upstream: {{url: "https://localhost:{server.port}", tls: {{verify: false}}}}
          - name: untrusted
            match: {{host: untrusted}}
            upstream: "https://localhost:{server.port}"
    """)
    async with http.get(fender.proxy_url + "/x", headers={"Host": "secure"}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"secure": True, "path": "/x"}
    async with http.get(fender.proxy_url + "/y", headers={"Host": "unverified"}) as resp:
        assert resp.status == 200
    # the system trust store does not know this self-signed certificate
    async with http.get(fender.proxy_url + "/z", headers={"Host": "untrusted"}) as resp:
        assert resp.status == 502
        assert resp.headers["x-fender-error"] == "upstream_unavailable"
        assert "certificate" in (await resp.json())["message"].lower()
