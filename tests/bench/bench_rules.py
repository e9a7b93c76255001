"""Benchmark (issue 4): throughput of :func:`oauthmig.redirects.rules.check_uri`.

Generates ``--uris`` distinct redirect URIs (a realistic registration mix: mostly clean https
web callbacks, native private-use and loopback redirects, plus a share of bad ones hitting
every per-URI rule), each with the application type it would be registered under, then times
``check_uri`` over all of them in this one process (one core). Generation is not timed.
Target: >= 100k URIs/s per core.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from oauthmig.redirects.rules import check_uri
from tests.bench.bench_common import load, machine, pass_fail, percentile

TARGET_PER_SECOND = 100_000
REPEATS = 3

Gen = Callable[[random.Random, int], str]

_PATHS = ("/oauth/callback", "/callback", "/auth/complete", "/sso/sentry/", "/integrations/cb")
_TLDS = ("com", "io", "dev", "net", "org", "co.uk")


def _host(rng: random.Random, n: int) -> str:
    return f"{rng.choice(('app', 'api', 'login', 'www'))}-{n}.example{n % 97}.{rng.choice(_TLDS)}"


def _web(rng: random.Random, n: int) -> str:
    uri = f"https://{_host(rng, n)}{rng.choice(_PATHS)}"
    r = rng.random()
    if r < 0.15:
        uri += f"?state_v={n % 7}&tenant=t{n}"
    elif r < 0.25:
        uri = f"https://{_host(rng, n)}:{8443 + n % 10}{rng.choice(_PATHS)}"
    return uri


def _native(rng: random.Random, n: int) -> str:
    scheme = f"com.example{n % 89}.app{n}"
    return f"{scheme}:/oauth2redirect" if rng.random() < 0.85 else f"{scheme}:/callback/{n % 13}"


def _loopback(rng: random.Random, n: int) -> str:
    port = 1024 + n % 60000
    r = rng.random()
    if r < 0.7:
        return f"http://127.0.0.1:{port}/callback"
    if r < 0.85:
        return f"http://[::1]:{port}/oauth/callback"
    return f"http://localhost:{port}/callback"  # RU010 warning


_BAD: tuple[tuple[str, Gen], ...] = (
    ("fragment", lambda r, n: f"https://{_host(r, n)}/cb#done"),
    ("empty-fragment", lambda r, n: f"https://{_host(r, n)}/cb#"),
    ("wildcard-host", lambda r, n: f"https://*.example{n % 97}.com/cb"),
    ("wildcard-path", lambda r, n: f"https://{_host(r, n)}/*"),
    ("userinfo", lambda r, n: f"https://user:pass@{_host(r, n)}/cb"),
    ("javascript", lambda r, n: f"javascript:alert({n})"),
    ("data", lambda r, n: "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=="),
    ("file", lambda r, n: f"file:///home/u{n}/cb.html"),
    ("oob", lambda r, n: "urn:ietf:wg:oauth:2.0:oob"),
    ("relative", lambda r, n: f"/oauth/callback/{n}"),
    ("space", lambda r, n: f"https://my app-{n}.example.com/cb"),
    ("non-ascii", lambda r, n: f"https://bücher-{n}.example.com/callback"),
    ("http-web", lambda r, n: f"http://{_host(r, n)}/oauth/callback"),
    ("bad-port", lambda r, n: f"https://{_host(r, n)}:99999/cb"),
    ("bad-percent", lambda r, n: f"https://{_host(r, n)}/cb%zz"),
    ("not-normalized", lambda r, n: f"HTTPS://APP-{n}.Example.COM:443/a/./b/../cb"),
    (
        "too-long",
        lambda r, n: f"https://{_host(r, n)}/cb?" + "&".join(f"p{i}=v{n}" for i in range(40)),
    ),
    ("private-two-slashes", lambda r, n: f"com.example.app{n}://callback"),
    ("private-no-dot", lambda r, n: f"myapp{n}:/callback"),
    ("https-loopback", lambda r, n: f"https://127.0.0.1:{1024 + n % 60000}/cb"),
    ("other-loopback", lambda r, n: f"http://127.0.0.2:{1024 + n % 60000}/cb"),
    ("http-lan", lambda r, n: f"http://192.168.1.{n % 250 + 1}/cb"),
)

# (category, share, app type, generator); shares add up to 1.
_MIX: tuple[tuple[str, float, str, Gen], ...] = (
    ("web (clean https)", 0.55, "web", _web),
    ("native private-use", 0.15, "native", _native),
    ("native loopback", 0.10, "native", _loopback),
    ("bad / noisy", 0.20, "", lambda r, n: ""),  # expanded below
)


@dataclass(frozen=True)
class Item:
    """One generated URI, its category and the app type it is checked under."""

    category: str
    uri: str
    app_type: str


def generate(count: int, seed: int) -> list[Item]:
    """``count`` URIs in the mix above, shuffled, deterministic for ``seed``."""
    rng = random.Random(f"{seed}:bench-rules")
    items: list[Item] = []
    for n in range(count):
        r = rng.random()
        acc = 0.0
        for category, share, app_type, gen in _MIX:
            acc += share
            if r < acc or category == _MIX[-1][0]:
                if app_type:
                    items.append(Item(category, gen(rng, n), app_type))
                else:
                    _name, bad = rng.choice(_BAD)
                    items.append(Item(category, bad(rng, n), rng.choice(("web", "native"))))
                break
    return items


def _time(pairs: list[tuple[str, str]]) -> float:
    check = check_uri
    t0 = time.perf_counter()
    for uri, app_type in pairs:
        check(uri, app_type)
    return time.perf_counter() - t0


def main(*, uris: int, seed: int) -> bool:
    """Time ``check_uri`` over ``uris`` generated URIs; True if the target is met."""
    print(f"== rules: check_uri over {uris:,} generated URIs, one process")
    print(f"   {machine()}")
    t0 = time.perf_counter()
    items = generate(uris, seed)
    pairs = [(i.uri, i.app_type) for i in items]
    print(f"   generated in {time.perf_counter() - t0:.1f} s (not timed)")
    verdicts = Counter(check_uri(u, t).verdict for u, t in pairs[:100_000])
    sample = min(len(pairs), 100_000)
    print(
        "   verdicts of the first {:,}: {}".format(
            sample, ", ".join(f"{v} {100 * c / sample:.1f} %" for v, c in verdicts.most_common())
        )
    )
    runs: list[float] = []
    for i in range(REPEATS):
        before = load()
        seconds = _time(pairs)
        runs.append(seconds)
        print(
            f"   run {i + 1}: {seconds:.2f} s, {1e6 * seconds / uris:.2f} µs/URI, "
            f"{uris / seconds:,.0f} URIs/s (load {before})"
        )
    median = percentile(runs, 50)
    rate = uris / median
    print("   by category (one run each):")
    by_cat: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        by_cat.setdefault(item.category, []).append((item.uri, item.app_type))
    for category, group in by_cat.items():
        seconds = _time(group)
        print(
            f"     {category:<20} {len(group):>9,} URIs  {1e6 * seconds / len(group):6.2f} µs/URI"
            f"  {len(group) / seconds:>10,.0f} URIs/s"
        )
    ok = rate >= TARGET_PER_SECOND
    print(
        f"   median of {REPEATS}: {1e6 * median / uris:.2f} µs/URI, {rate:,.0f} URIs/s "
        f"(target >= {TARGET_PER_SECOND:,}/s per core): {pass_fail(ok)}"
    )
    return ok
