from config.models import MatchModel
from proxy.routing import RouteMatcher, Router, normalize_host


def matcher(**kw):
    return RouteMatcher(MatchModel(**kw))


def test_exact_host_ignores_port_and_case():
    m = matcher(host="payments")
    assert m.matches(normalize_host("Payments:8080"), "/x", "GET", {})
    assert not m.matches(normalize_host("payments2"), "/x", "GET", {})


def test_wildcard_host_matches_subdomains_only():
    m = matcher(host="*.example.com")
    assert m.matches("api.example.com", "/", "GET", {})
    assert m.matches("a.b.example.com", "/", "GET", {})
    assert not m.matches("example.com", "/", "GET", {})
    assert not m.matches("badexample.com", "/", "GET", {})


def test_path_prefix_is_segment_aware():
    m = matcher(path_prefix="/api")
    assert m.matches("h", "/api", "GET", {})
    assert m.matches("h", "/api/v1", "GET", {})
    assert not m.matches("h", "/apix", "GET", {})
    assert matcher(path_prefix="/api/").matches("h", "/api/x", "GET", {})


def test_methods_and_headers():
    m = matcher(methods=["get", "POST"], headers={"X-Tenant": "acme"})
    assert m.matches("h", "/", "POST", {"x-tenant": "acme"})
    assert not m.matches("h", "/", "DELETE", {"x-tenant": "acme"})
    assert not m.matches("h", "/", "GET", {"x-tenant": "other"})
    assert not m.matches("h", "/", "GET", {})


def test_first_match_wins_and_no_match_is_none():
    router = Router([(matcher(host="a", path_prefix="/x"), "ax"), (matcher(host="a"), "a"), (matcher(), "any")])
    assert router.match("a", "/x/1", "GET", {}) == "ax"
    assert router.match("a", "/y", "GET", {}) == "a"
    assert router.match("b", "/y", "GET", {}) == "any"
    assert Router([(matcher(host="a"), "a")]).match("b", "/", "GET", {}) is None


def test_normalize_host_handles_ipv6_and_trailing_dot():
    assert normalize_host("[::1]:8080") == "::1"
    assert normalize_host("Example.COM.") == "example.com"
    assert normalize_host(None) == ""


def test_first_match_wins_across_host_kinds_and_beyond_the_host_cache():
    # the per-host shortlist keeps config order between exact, wildcard and host-less routes
    router = Router([
        (matcher(path_prefix="/first"), "anyhost-first"),
        (matcher(host="*.example.com"), "wild"),
        (matcher(host="api.example.com"), "exact-after-wild"),
        (matcher(host="other"), "other"),
        (matcher(), "fallback"),
    ])
    for _ in range(2):  # the second time from the shortlist kept for the host
        assert router.match("api.example.com", "/first/x", "GET", {}) == "anyhost-first"
        assert router.match("api.example.com", "/", "GET", {}) == "wild"
        assert router.match("other", "/", "GET", {}) == "other"
        assert router.match("nothing", "/", "GET", {}) == "fallback"
    for i in range(3000):  # more distinct hosts than are kept: still matched, memory bounded
        assert router.match(f"h{i}.example.com", "/", "GET", {}) == "wild"
    assert len(router._by_host) <= 1024
