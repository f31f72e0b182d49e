from config.checks import warnings
from config.loader import load_text


def warn(chain: str, *, policies: str = "", defaults: str = "", **kw):
    text = f"""
{defaults}
policies: {{{policies}}}
routes:
  - name: a
    upstream: http://x
    chain: {chain}
"""
    return [(i.loc, i.msg) for i in warnings(load_text(text).config, **kw)]


def test_recommended_order_is_quiet():
    assert warn("[{rate_limit: {rate: 10/s}}, {timeout: 5s}, {retry: {}}, {circuit_breaker: {}}, {timeout: 1s}]") == []


def test_retry_outside_rate_limit():
    found = warn("[{retry: {}}, {rate_limit: {rate: 10/s}}]")
    assert [loc for loc, _ in found] == ["routes[0].chain[1]"]
    assert "inside retry" in found[0][1]


def test_breaker_outside_retry_names_the_shared_policy():
    found = warn("[b, {retry: {}}]", policies="b: {circuit_breaker: {}}")
    assert [loc for loc, _ in found] == ["routes[0].chain[0]"]
    assert found[0][1].startswith("b sits outside retry")


def test_per_attempt_timeout_not_shorter_than_total():
    found = warn("[{timeout: 1s}, {retry: {}}, {timeout: 2s}]")
    assert found == [("routes[0].chain[2]", found[0][1])]
    assert "per-attempt timeout 2s" in found[0][1] and "total timeout 1s" in found[0][1]
    assert warn("[{timeout: 3s}, {retry: {}}, {timeout: 1s}]") == []


def test_retry_on_timeout_without_a_per_attempt_timeout():
    found = warn("[{timeout: 3s}, {retry: {on: [timeout]}}]")
    assert len(found) == 1 and "never fires" in found[0][1]


def test_retrying_non_idempotent_methods():
    found = warn("[{retry: {methods: [GET, POST]}}]")
    assert len(found) == 1 and "POST" in found[0][1]


def test_fallback_inside_retry_or_breaker():
    found = warn("[{retry: {}}, {circuit_breaker: {}}, {fallback: {}}]")
    assert len(found) == 2
    assert all(loc == "routes[0].chain[2]" for loc, _ in found)


def test_nested_retries():
    found = warn("[{retry: {}}, {retry: {}}]")
    assert len(found) == 1 and "multiply" in found[0][1]


def test_unbounded_bulkhead_queue():
    assert len(warn("[{bulkhead: {max_queue: 5}}]")) == 1
    assert warn("[{timeout: 1s}, {bulkhead: {max_queue: 5}}]") == []
    assert warn("[{bulkhead: {max_queue: 5, queue_timeout: 1s}}]") == []


def test_redis_backend_without_redis():
    chain = "[{rate_limit: {rate: 10/s, backend: redis}}]"
    assert warn(chain) == []  # unknown whether Redis is configured: say nothing
    found = warn(chain, redis_configured=False)
    assert len(found) == 1 and "FENDER_REDIS_URL" in found[0][1] and "refuses this config" in found[0][1]
    assert warn(chain, redis_configured=True) == []


def test_fender_run_refuses_a_redis_backed_limit_without_redis_url(monkeypatch, capsys, tmp_path):
    # (README: no fallback to local buckets, which would admit N times the limit across N replicas)
    from proxy.cli import main

    path = tmp_path / "fender.yaml"
    path.write_text("routes: [{name: a, upstream: 'http://x', chain: [{rate_limit: {rate: 10/s, backend: redis}}]}]")
    monkeypatch.delenv("FENDER_REDIS_URL", raising=False)
    for name in ("FENDER_PROXY_ADDR", "FENDER_ADMIN_ADDR", "FENDER_METRICS_ADDR"):
        monkeypatch.setenv(name, "127.0.0.1:0")
    assert main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("routes[0].chain[0]: rate_limit uses backend redis but FENDER_REDIS_URL is not set")


def test_redis_without_url_locates_every_redis_backed_limit():
    from config.checks import redis_without_url
    from config.loader import load_text

    config = load_text("""
policies:
  shared: {rate_limit: {rate: 10/s, backend: redis}}
routes:
  - {name: a, upstream: "http://x", chain: [shared, {rate_limit: {rate: 5/s}}]}
  - {name: b, upstream: "http://x", chain: [{timeout: 1s}, {rate_limit: {rate: 5/s, backend: redis}}]}
""").config
    assert [i.loc for i in redis_without_url(config)] == ["routes[0].chain[0]", "routes[1].chain[1]"]


def test_default_chain_is_reported_once_at_its_own_location():
    text = """
defaults:
  chain: [{retry: {}}, {rate_limit: {rate: 1/s}}]
routes:
  - {name: a, upstream: http://x}
  - {name: b, upstream: http://y}
"""
    found = warnings(load_text(text).config)
    assert [i.loc for i in found] == ["defaults.chain[1]"]


def test_fender_check_warns_of_settings_that_fender_run_would_refuse(monkeypatch, capsys, tmp_path):
    # the config is valid (exit 0), but the same shell's `fender run` would exit 1: say so, masked
    from proxy.cli import main

    path = tmp_path / "fender.yaml"
    path.write_text("routes: [{name: a, upstream: 'http://x', chain: [{rate_limit: {rate: 10/s, backend: redis}}]}]")
    monkeypatch.setenv("FENDER_REDIS_URL", "redis://:s3cret@localhost:notaport/0")
    monkeypatch.setenv("FENDER_LOG_LEVEL", "loud")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["warning"] * 2
    assert out[0].startswith("warning: FENDER_REDIS_URL: ") and out[0].endswith("refuses to start with it)")
    assert out[1].startswith("warning: FENDER_LOG_LEVEL: ")
    assert "s3cret" not in "\n".join(out)
    # with FENDER_REDIS_URL unset as well, the redis-backed limit is flagged as before
    monkeypatch.delenv("FENDER_REDIS_URL")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "routes[0].chain[0]: rate_limit uses backend redis but FENDER_REDIS_URL is not set" in out
    assert "FENDER_LOG_LEVEL" in out
