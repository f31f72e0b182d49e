import pytest

from config.factory import PolicyFactory
from config.loader import ConfigInvalid, load_text
from policies.breaker_state import CountWindow, TimeWindow
from policies.bulkhead import BulkheadPolicy
from policies.circuit_breaker import CircuitBreakerPolicy
from policies.errors import CircuitOpen
from policies.fallback import FallbackPolicy
from policies.rate_limit import RateLimitPolicy
from policies.retry import RetryPolicy
from policies.testing import FakeClock, ScriptedUpstream, make_ctx
from policies.timeout import TimeoutPolicy
from policies.token_bucket import LocalBucketStore
from proxy.cli import main

CONFIG = """
version: 1
defaults:
  chain:
    - timeout: 10s
    - retry: {attempts: 2}
policies:
  shared-breaker:
    circuit_breaker: {consecutive_failures: 2, open_for: 30s}
routes:
  - name: payments
    upstream: http://127.0.0.1:1
    match: {host: payments}
    chain:
      - fallback: {on: [circuit_open], status: 503, body: {error: later}}
      - rate_limit: {rate: 100/s}
      - timeout: 5s
      - retry: {attempts: 3, max_body: 1MiB}
      - shared-breaker
      - timeout: 1s
      - bulkhead: {max_concurrent: 10, max_queue: 5, queue_timeout: 1s}
  - name: orders
    upstream: http://127.0.0.1:2
    match: {host: orders}
    chain: [shared-breaker]
  - name: plain
    upstream: http://127.0.0.1:3
    match: {host: plain}
  - name: none
    upstream: http://127.0.0.1:4
    match: {host: none}
    chain: []
"""


def build(text=CONFIG, factory=None):
    factory = factory or PolicyFactory(clock=FakeClock())
    return factory, factory.build(load_text(text).config)


def test_chain_order_labels_and_types():
    _, chains = build()
    pay = chains["payments"]
    assert [label for label, _ in pay.policies] == [
        "fallback", "rate_limit", "timeout", "retry", "shared-breaker", "timeout-2", "bulkhead"]
    assert [type(p) for _, p in pay.policies] == [
        FallbackPolicy, RateLimitPolicy, TimeoutPolicy, RetryPolicy, CircuitBreakerPolicy,
        TimeoutPolicy, BulkheadPolicy]
    assert [p.duration for _, p in pay.policies if isinstance(p, TimeoutPolicy)] == [5.0, 1.0]
    assert chains["none"].policies == ()


def test_named_policies_are_shared_and_inline_ones_are_per_route():
    _, chains = build()
    assert dict(chains["payments"].policies)["shared-breaker"] is dict(chains["orders"].policies)["shared-breaker"]
    # the default chain is inline: each route that inherits it gets its own instances
    f1 = build()[1]["plain"].policies
    assert [label for label, _ in f1] == ["timeout", "retry"]


def test_buffer_limit_is_the_largest_retry_max_body():
    _, chains = build()
    assert chains["payments"].buffer_limit == 1024 * 1024
    assert chains["plain"].buffer_limit == 64 * 1024
    assert chains["orders"].buffer_limit == 0


def test_defaults_are_applied():
    _, chains = build()
    pay = dict(chains["payments"].policies)
    limit = pay["rate_limit"]
    assert (limit.rate, limit.burst, limit.key, limit.wait, limit.shadow) == (100.0, 100.0, "route", 0.0, False)
    retry = pay["retry"]
    assert retry.attempts == 3 and retry.retry_after_max == 10.0
    assert (retry.backoff.base, retry.backoff.max) == (0.025, 0.25)
    assert (retry.budget.ratio, retry.budget.min_per_second) == (0.2, 10.0)
    breaker = pay["shared-breaker"].machine
    assert (breaker.consecutive_failures, breaker.open_for, breaker.max_open_for, breaker.half_open_calls) == (
        2, 30.0, 300.0, 1)
    bulkhead = pay["bulkhead"]
    assert (bulkhead.max_concurrent, bulkhead.max_queue, bulkhead.queue_timeout) == (10, 5, 1.0)
    assert pay["fallback"].body == b'{"error":"later"}'


def breakers(*params: str) -> str:
    """A config whose route `a` has a chain of circuit breakers with these parameters."""
    chain = "".join(f"\n      - circuit_breaker: {p}" for p in params)
    return f"routes:\n  - name: a\n    upstream: http://x\n    chain:{chain}\n"


def machines_of(text: str) -> list:
    _, chains = build(text)
    return [p.machine for _, p in chains["a"].policies]


def test_a_long_open_for_alone_raises_the_default_max_open_for_with_it():
    machines = machines_of(breakers("{open_for: 10m}", "{open_for: 10s, max_open_for: 1m}"))
    assert [(m.open_for, m.max_open_for) for m in machines] == [(600.0, 600.0), (10.0, 60.0)]
    with pytest.raises(ConfigInvalid, match="max_open_for must not be smaller than open_for"):
        load_text(breakers("{open_for: 10m, max_open_for: 5m}"))


@pytest.mark.parametrize(("policy", "message"), [
    ("circuit_breaker: {open_for: 1.0e+300, max_open_for: 1.0e+300}", "at most 365 days"),
    ("timeout: 8761h", "at most 365 days"),
    ("rate_limit: {rate: 1.0e-300}", "at least one a day"),
    # (a bucket smaller than one token never grants one: the route would refuse every request)
    ("rate_limit: {rate: 10/s, burst: 0.5}", "greater than or equal to 1"),
    # (infinity passed, and GET /config and GET /routes then answered JSON with a bare Infinity)
    ("rate_limit: {rate: 10/s, burst: .inf}", "finite number"),
    ("retry: {budget: {min_per_second: .inf}}", "finite number"),
    ("fallback: {body: {retry_in: .inf}}", "JSON has no"),
    # (explicitly tagged YAML values no JSON body holds: `fender run` died on them with a TypeError)
    ("fallback: {body: {since: !!timestamp 2024-01-01}}", "JSON has no"),
    ("fallback: {body: [!!binary aGVsbG8=]}", "JSON has no"),
    ("fallback: {body: {tags: !!set {a, b}}}", "JSON has no"),
])
def test_absurd_durations_and_rates_are_refused_with_their_place(policy, message):
    # (they overflowed dates, and made Retry-After a number of three hundred digits)
    with pytest.raises(ConfigInvalid, match=rf"routes\[0\]\.chain\[0\]\..*{message}"):
        load_text(f"routes: [{{name: a, upstream: http://x, chain: [{{{policy}}}]}}]")


def test_yaml_dates_stay_strings_as_in_yaml_1_2():
    # (YAML 1.1 made them dates, which no JSON body can hold: `fender check` said ok and
    # `fender run` died building the fallback with a TypeError)
    text = CONFIG.replace("body: {error: later}", "body: {since: 2024-01-01, at: 2001-12-14 21:59:43.10}")
    _, chains = build(text)
    fallback = chains["payments"].policies[0][1]
    assert isinstance(fallback, FallbackPolicy)
    assert load_text(text).config.routes[0].chain[0].fallback.body == {
        "since": "2024-01-01", "at": "2001-12-14 21:59:43.10"}


def test_yaml_numbers_are_read_as_yaml_1_2_and_json_read_them():
    # (YAML 1.1 made 10:30 the number 630 and 017 the number 15, silently, in a fallback's body)
    body = "{opens: 10:30, code: 017, hex: 0x1f, oct: 0o17, big: 1e3, id: 1_000, neg: -5, half: .5}"
    text = CONFIG.replace("body: {error: later}", f"body: {body}")
    assert load_text(text).config.routes[0].chain[0].fallback.body == {
        "opens": "10:30", "code": 17, "hex": 31, "oct": 15, "big": 1000.0, "id": "1_000", "neg": -5, "half": 0.5}
    with pytest.raises(ConfigInvalid, match=r"line 1 column \d+: invalid YAML: '0b11' is not an integer"):
        load_text("routes: [{name: a, upstream: http://x, chain: [{retry: {attempts: !!int 0b11}}]}]")


def test_yaml_nested_past_the_parser_is_one_error_not_a_traceback():
    with pytest.raises(ConfigInvalid, match="nests too deeply"):
        load_text("routes: []\na: " + "[" * 5000 + "]" * 5000)


@pytest.mark.parametrize(("text", "message"), [
    (None, "cannot read: No such file or directory"),
    ("", "the config is empty (write `routes: []` to route nothing)"),
    ("- routes\n", "the config must be a YAML mapping"),
])
def test_a_problem_of_the_whole_file_is_located_by_its_path(tmp_path, capsys, text, message):
    path = tmp_path / "fender.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}: {message}"]


def test_failure_rate_windows():
    text = breakers("{failure_rate: 0.3, window: 10s, min_calls: 5}", "{failure_rate: 0.3, window_calls: 50}",
                    "{slow_call_duration: 2s}")
    machines = machines_of(text)
    assert isinstance(machines[0].window, TimeWindow) and machines[0].window.seconds == 10
    assert isinstance(machines[1].window, CountWindow) and machines[1].window.size == 50
    assert isinstance(machines[2].window, CountWindow) and machines[2].window.size == 100
    assert machines[2].failure_rate == 0.5 and machines[2].slow_call_duration == 2.0
    assert [label for label, _ in build(text)[1]["a"].policies] == [
        "circuit_breaker", "circuit_breaker-2", "circuit_breaker-3"]


def test_any_failure_rate_knob_selects_rate_mode_with_specs_defaults_for_the_rest():
    machines = machines_of(breakers("{window: 30s}", "{window_calls: 40}", "{failure_rate: 0.3}",
                                    "{consecutive_failures: 3}"))
    assert isinstance(machines[0].window, TimeWindow) and machines[0].window.seconds == 30
    assert isinstance(machines[1].window, CountWindow) and machines[1].window.size == 40
    assert [(m.failure_rate, m.min_calls, m.slow_call_duration, m.slow_call_rate) for m in machines[:3]] == [
        (0.5, 20, 2.0, 1.0), (0.5, 20, 2.0, 1.0), (0.3, 20, 2.0, 1.0)]
    assert machines[3].window is None and machines[3].slow_call_duration is None  # (consecutive mode)
    with pytest.raises(ConfigInvalid, match="either consecutive_failures or failure-rate mode"):
        load_text(breakers("{window: 30s, consecutive_failures: 3}"))


def test_min_calls_or_slow_call_rate_written_alone_ask_for_rate_mode_too():
    # (they have numbers for defaults, but written down they mean the rate breaker: not dropped)
    machines = machines_of(breakers("{slow_call_rate: 0.5}", "{min_calls: 10}", "{}"))
    assert [(m.failure_rate, m.min_calls, m.slow_call_duration, m.slow_call_rate) for m in machines[:2]] == [
        (0.5, 20, 2.0, 0.5), (0.5, 10, 2.0, 1.0)]
    assert machines[2].window is None  # nothing written: consecutive mode, SPEC's default
    for knobs in ("{consecutive_failures: 3, min_calls: 10}", "{consecutive_failures: 3, slow_call_rate: 0.5}"):
        with pytest.raises(ConfigInvalid, match="either consecutive_failures or failure-rate mode"):
            load_text(breakers(knobs))


@pytest.mark.parametrize("knob", ["{min_calls: 20}", "{slow_call_rate: 1.0}"])
def test_a_reload_that_only_switches_the_breaker_mode_builds_a_new_breaker(knob):
    # (written at their default values, min_calls and slow_call_rate select rate mode but leave the
    # model's dump as it was: the reload kept the consecutive breaker, and the reverse too)
    factory, first = build(breakers("{}"))
    _, second = build(breakers(knob), factory)
    assert second["a"].policies[0][1] is not first["a"].policies[0][1]
    assert second["a"].policies[0][1].machine.window is not None  # rate mode
    _, third = build(breakers("{}"), factory)
    assert third["a"].policies[0][1].machine.window is None  # consecutive mode again


async def test_reload_keeps_the_state_of_unchanged_policies_and_renews_changed_ones():
    clock = FakeClock()
    factory = PolicyFactory(clock=clock)
    _, first = build(factory=factory)
    breaker = dict(first["orders"].policies)["shared-breaker"]
    for _ in range(2):
        await breaker(ScriptedUpstream(clock, 503), make_ctx())
    assert breaker.describe()["state"] == "open"
    limit = dict(first["payments"].policies)["rate_limit"]

    # an unrelated change: the breaker and the bucket carry over, still open
    _, second = build(CONFIG.replace("max_concurrent: 10", "max_concurrent: 20"), factory)
    assert dict(second["orders"].policies)["shared-breaker"] is breaker
    assert dict(second["payments"].policies)["rate_limit"] is limit
    with pytest.raises(CircuitOpen):
        await second["orders"].policies[0][1](ScriptedUpstream(clock, 200), make_ctx())
    assert dict(second["payments"].policies)["bulkhead"].max_concurrent == 20

    # the breaker's own parameters change: a fresh, closed breaker
    _, third = build(CONFIG.replace("open_for: 30s", "open_for: 10s"), factory)
    fresh = dict(third["orders"].policies)["shared-breaker"]
    assert fresh is not breaker and fresh.describe()["state"] == "closed"


def test_describe_shows_live_state_for_the_admin_api():
    factory, chains = build()
    described = chains["payments"].describe()
    assert [d["label"] for d in described][:2] == ["fallback", "rate_limit"]
    assert described[1]["tokens"] == 100.0
    assert described[4]["state"] == "closed" and described[4]["name"] == "shared-breaker"
    assert described[6]["in_flight"] == 0 and described[6]["queued"] == 0
    assert factory.breaker("shared-breaker") is dict(chains["orders"].policies)["shared-breaker"]
    assert set(factory.breakers()) == {"shared-breaker"}


def test_inline_breakers_are_found_by_route_and_label():
    text = """
routes:
  - name: a
    upstream: http://x
    chain: [{circuit_breaker: {}}]
"""
    factory, chains = build(text)
    assert factory.breaker("a.circuit_breaker") is chains["a"].policies[0][1]
    assert factory.breaker("nope") is None


def test_redis_backend_uses_the_shared_store_when_given():
    text = """
routes:
  - name: a
    upstream: http://x
    chain: [{rate_limit: {rate: 5/s, backend: redis}}]
"""
    store = LocalBucketStore()
    _, chains = build(text, PolicyFactory(clock=FakeClock(), redis_store=store))
    assert chains["a"].policies[0][1].describe()["backend"] == "remote"
    _, chains = build(text, PolicyFactory(clock=FakeClock()))
    assert chains["a"].policies[0][1].describe()["backend"] == "local"


def test_an_inline_policy_that_only_moves_in_its_chain_keeps_its_state():
    factory, first = build()
    limit = dict(first["payments"].policies)["rate_limit"]
    # a new policy in front of it shifts every index of the chain
    _, second = build(CONFIG.replace("      - fallback:", "      - bulkhead: {max_concurrent: 50}\n      - fallback:", 1), factory)
    assert dict(second["payments"].policies)["rate_limit"] is limit
