"""What GET /config must never show, and what it must keep readable."""

from __future__ import annotations

from typing import Any

from config.redact import REDACTED, mask_url_password, redact, redact_url

PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


def test_urls_lose_only_their_password() -> None:
    assert redact_url("postgresql://app:s3cret@db:5432/x?sslmode=require") == (
        f"postgresql://app:{REDACTED}@db:5432/x?sslmode=require"
    )
    assert redact_url("https://token@host/path") == "https://<redacted>@host/path"  # a user name alone is often the secret
    assert redact_url("http://host:8080") == "http://host:8080"
    assert redact_url("redis://:pw@cache:6379/0") == f"redis://:{REDACTED}@cache:6379/0"
    # (libpq and redis-py take a password from the query too)
    assert redact_url("postgresql://db/x?user=app&password=s3cret&sslmode=require") == (
        "postgresql://db/x?user=app&password=%3Credacted%3E&sslmode=require"
    )
    assert redact_url("postgresql://app:pw@db/x?password=s3cret").count("s3cret") == 0
    assert redact_url("http://host/path?passwords=x") == "http://host/path?passwords=x"


def test_secret_keys_and_credential_values_are_replaced_anywhere() -> None:
    doc: dict[str, Any] = {
        "routes": [{
            "name": "payments",
            "match": {"headers": {"Authorization": "Basic dXNlcjpwYXNz", "x-tenant": "acme"}},
            "upstream": {"url": "https://svc:pw@payments:8443", "tls": {
                "verify": True, "ca_file": "/etc/ca.pem", "server_name": "payments",
                "key": PEM, "cert": "/etc/cert.pem", "passphrase": "p"}},
            "chain": [
                {"rate_limit": {"rate": "10/s", "key": "header:x-api-key"}},
                {"fallback": {"headers": {"X-Api-Key": "k-123", "Set-Cookie": "sid=abc",
                                          "content-type": "application/json"},
                              "body": {"token": "t-1", "message": "down"}}},
            ],
        }],
        "sagas": {"order": {"steps": [{"name": "pay", "action": {
            "route": "payments", "headers": {"x-auth": JWT, "x-trace": "Bearer abc.def"}}}]}},
        "extra": {"client_secret": "cs", "password": 1234, "session_id": "s", "note": PEM},
    }
    out = redact(doc)
    text = repr(out)
    for secret in ("dXNlcjpwYXNz", ":pw@", "BEGIN PRIVATE", "k-123", "sid=abc", "t-1", JWT[:20],
                   "Bearer abc", "'cs'", "1234", "'p'"):
        assert secret not in text, secret
    route = out["routes"][0]
    assert route["match"]["headers"] == {"Authorization": REDACTED, "x-tenant": "acme"}
    tls = route["upstream"]["tls"]
    assert tls["verify"] is True and tls["ca_file"] == "/etc/ca.pem" and tls["server_name"] == "payments"
    assert tls["key"] == REDACTED and tls["passphrase"] == REDACTED
    # what is configuration, not a secret, stays readable
    assert route["chain"][0] == {"rate_limit": {"rate": "10/s", "key": "header:x-api-key"}}
    assert route["chain"][1]["fallback"]["headers"]["content-type"] == "application/json"
    assert route["chain"][1]["fallback"]["body"]["message"] == "down"
    assert out["routes"][0]["name"] == "payments"
    assert doc["extra"]["password"] == 1234, "the input is not modified"


def test_names_that_merely_contain_secret_words_as_policy_names_are_kept() -> None:
    doc = {"policies": {"token-breaker": {"circuit_breaker": {"consecutive_failures": 3}}}}
    assert redact(doc) == doc


def test_a_password_holding_an_unescaped_slash_question_mark_or_hash_is_still_hidden() -> None:
    # (urlsplit ends the authority at the first / ? or #, so the password looked like a host
    # and a port, and the URL was shown whole: in the start-up error of an unopenable store)
    for url in ("postgresql://app:pa#ss@db:5432/x", "postgresql://app:pa?ss@db/x", "postgresql://app:pa/ss@db/x",
                "redis://:/s3cret@cache:6379/0"):
        shown = redact_url(url)
        assert ":pa" not in shown and "ss@" not in shown and "s3cret" not in shown, shown
        assert shown.endswith("/0") or shown.endswith("/x"), shown
    assert redact_url("postgresql://app:pa#ss@db:5432/x") == f"postgresql://app:{REDACTED}@db:5432/x"
    # (a password starting with digits read as a port: only a web address has an @ in its path)
    assert redact_url("postgresql://app:123/x@db/x") == f"postgresql://app:{REDACTED}@db/x"
    # a path with an @ after a host and a port is not a password
    assert redact_url("http://host:8080/users/@me") == "http://host:8080/users/@me"
    assert redact_url("http://[::1]/a@b") == "http://[::1]/a@b"


def test_an_at_sign_in_the_query_of_a_url_with_a_port_is_not_taken_for_a_password() -> None:
    # (`user=me@corp` or `application_name=fender@pod-1`: the URL reads as host, port, database and
    # query, as the driver reads it; it was shown as `postgresql://db:<redacted>@corp`, and the
    # database's name was masked out of the driver's error)
    for url in ("postgresql://db:5432/app?user=me@corp", "postgresql://db:5432/app?sslmode=require&application_name=f@pod-1",
                "redis://cache:6379/0?client_name=fender@pod-1"):
        assert redact_url(url) == url
        assert mask_url_password('database "app" does not exist at db:5432', url) == (
            'database "app" does not exist at db:5432')
    # a password starting with digits and holding a ? is still hidden (what follows it is no query)
    assert redact_url("postgresql://app:12?3@db/x") == f"postgresql://app:{REDACTED}@db/x"


def test_a_password_no_parser_cuts_short_is_masked_whole_not_in_pieces() -> None:
    # (escaped, or holding only characters a userinfo may: no parser quotes a piece of it, and its
    # pieces masked words of the driver's error, "pa***word authentication failed")
    message = 'password authentication failed for user "app"'
    for url in ("postgresql://app:p%40ss%2Fw0rd@db/x", "postgresql://app:Xy9&pass=on@db/x",
                "postgresql://db/x?user=app&password=pass;on"):
        assert mask_url_password(message, url) == message, url
    assert mask_url_password("bad password p@ss/w0rd", "postgresql://app:p%40ss%2Fw0rd@db/x") == "bad password ***"
    # cut short by an unescaped / ? or #, its pieces still go (a parser quotes them as a host or port)
    assert mask_url_password("invalid port 'pass'", "postgresql://app:pass#on@db/x") == "invalid port '***'"
    # (asyncpg ends the userinfo at its first @, and quotes the rest of the password as a port)
    assert mask_url_password("invalid literal for int() with base 10: '99@db'", "postgresql://app:s3cr@t:99@db/x") == (
        "invalid literal for int() with base 10: '***@db'")
