"""Redirect URI rules (oauthmig.redirects.rules): registry, per-URI and application checks."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oauthmig.redirects.rules import (
    RULES,
    AppType,
    Severity,
    check_application,
    check_uri,
    classify_uri_style,
    infer_app_type,
    split_redirect_uris,
)
from tests.test_metadata_rules import METADATA_CASES

WEB = AppType.WEB
NATIVE = AppType.NATIVE

# The rule table of docs/rules.md, copied by hand: codes are a public contract and must never drift.
RULE_TABLE = {
    "RU001": ("not-a-uri", "error"),
    "RU002": ("relative", "error"),
    "RU003": ("fragment", "error"),
    "RU004": ("wildcard", "error"),
    "RU005": ("userinfo", "error"),
    "RU006": ("forbidden-scheme", "error"),
    "RU007": ("oob", "error"),
    "RU008": ("https-required", "error"),
    "RU009": ("http-not-loopback", "error"),
    "RU010": ("localhost-name", "warning"),
    "RU011": ("https-loopback", "warning"),
    "RU012": ("private-scheme-not-reverse-domain", "error"),
    "RU013": ("private-scheme-form", "warning"),
    "RU014": ("not-normalized", "info"),
    "RU015": ("duplicate", "info"),
    "RU016": ("too-long-for-grant", "warning"),
    # Added by the host rules (issue 11).
    "RU017": ("non-canonical-ipv4", "error"),
    "RU018": ("invalid-host", "error"),
    # Secret-bearing parameters (issue 22).
    "RU019": ("secret-parameter", "error"),
    "RU101": ("no-redirect-uris", "error"),
    "RU102": ("mixed-app-type", "warning"),
    "RU103": ("grant-redirect-unregistered", "warning"),
    "RU104": ("native-with-secret", "info"),
    # Client metadata rules (oauthmig.redirects.metadata_rules, issue 15).
    "RU105": ("metadata-url-invalid", "error"),
    "RU106": ("metadata-url-not-https", "error"),
    "RU107": ("metadata-url-userinfo", "error"),
    "RU108": ("metadata-url-fragment", "warning"),
    "RU109": ("private-key-jwt-without-jwks-uri", "error"),
    "RU110": ("auth-none-with-secret", "warning"),
    # The stored type against the URIs (issue 20: the compatibility layer stores "web").
    "RU111": ("app-type-mismatch", "warning"),
}


def test_registry_matches_design_table() -> None:
    assert {code: (r.name, r.severity.value) for code, r in RULES.items()} == RULE_TABLE
    assert list(RULES) == sorted(RULES)
    assert all(code == rule.code for code, rule in RULES.items())


@pytest.mark.parametrize("code", list(RULES))
def test_every_rule_is_documented(code: str) -> None:
    rule = RULES[code]
    assert rule.summary
    assert rule.rfc.startswith(("RFC ", "OpenID"))
    assert "RFC" in rule.doc
    assert "Anti-pattern" in rule.doc
    assert "Fix:" in rule.doc


# --- per-URI cases ----------------------------------------------------------------------------
# Each case: (uri, app_type, code, fires, grant_column_length). The meta-test below requires a
# firing and a non-firing case for every code.

_LONG_PREFIX = "https://app.example.com/"


def _sized(length: int) -> str:
    return _LONG_PREFIX + "a" * (length - len(_LONG_PREFIX))


URI_CASES: list[Any] = []


def case(
    case_id: str,
    uri: str,
    app: AppType,
    code: str,
    fires: bool,
    grant_column_length: int | None = 255,
) -> None:
    verb = "fires" if fires else "quiet"
    URI_CASES.append(
        pytest.param(uri, app, code, fires, grant_column_length, id=f"{code}-{verb}-{case_id}")
    )


# RU001 not-a-uri
for _id, _uri in [
    ("empty", ""),
    ("only-spaces", "   "),
    ("leading-space", " https://app.example.com/cb"),
    ("trailing-space", "https://app.example.com/cb "),
    ("tab", "https://app.example.com/\tcb"),
    ("newline", "https://app.example.com/cb\n"),
    ("nul", "https://app.example.com/cb\x00"),
    ("idn-non-ascii", "https://bücher.example/cb"),
    ("fullwidth-host", "https://ｅxample.com/cb"),
    ("fullwidth-path", "https://example.com/ｃｂ"),
    ("backslash-authority", "https:\\\\evil.example\\cb"),
    ("backslash-path", "https://app.example.com\\@evil.example/"),
    ("pct-zz", "https://app.example.com/%zz"),
    ("pct-bare", "https://app.example.com/100%"),
    ("bad-scheme", "1https://app.example.com/"),
    ("ipv6-garbage", "http://[::1::]/cb"),
    ("ipv4-in-brackets", "http://[127.0.0.1]/cb"),
    ("ipv6-zone-id", "http://[fe80::1%25en0]/cb"),
    ("port-non-numeric", "https://app.example.com:abc/"),
    ("port-65536", "https://app.example.com:65536/"),
    ("port-huge", "https://app.example.com:99999999999999999999/"),
    ("https-single-slash", "https:/x"),
    ("https-no-slash", "https:app.example.com"),
    ("http-empty-authority", "http://"),
    ("https-empty-host", "https:///cb"),
    ("http-port-only", "http://:8080/cb"),
    ("uppercase-single-slash", "HTTPS:/x"),
]:
    case(_id, _uri, WEB, "RU001", True)
case("native-http-no-host", "http:/cb", NATIVE, "RU001", True)
for _id, _uri in [
    ("https", "https://app.example.com/cb"),
    ("punycode", "https://xn--bcher-kva.example/cb"),
    ("empty-port", "https://app.example.com:/cb"),
    ("max-port", "https://app.example.com:65535/cb"),
    ("127.1-is-a-reg-name", "http://127.1/cb"),
    ("hex-host-is-a-reg-name", "http://0x7f000001/cb"),
    ("file-empty-host", "file:///etc/passwd"),
    ("private-use", "com.example.app:/cb"),
    ("ipvfuture", "https://[v1.x]/cb"),
    ("star-sub-delim-is-legal", "https://*.example.com/cb"),
]:
    case(_id, _uri, WEB, "RU001", False)

# RU002 relative
for _id, _uri in [
    ("absolute-path", "/oauth/callback"),
    ("network-path", "//app.example.com/cb"),
    ("bare-name", "callback"),
    ("host-without-scheme", "app.example.com/cb"),
    ("query-only", "?code=x"),
]:
    case(_id, _uri, WEB, "RU002", True)
case("https", "https://app.example.com/cb", WEB, "RU002", False)
case("private-use", "com.example.app:/cb", NATIVE, "RU002", False)
case("not-a-uri-wins", " /cb", WEB, "RU002", False)

# RU003 fragment (RFC 6749 §3.1.2)
case("empty", "https://app.example.com/cb#", WEB, "RU003", True)
case("value", "https://app.example.com/cb#done", WEB, "RU003", True)
case("spa-route", "https://app.example.com/#/callback", WEB, "RU003", True)
case("relative", "/cb#x", WEB, "RU003", True)
case("native-loopback", "http://127.0.0.1/cb#", NATIVE, "RU003", True)
case("none", "https://app.example.com/cb", WEB, "RU003", False)
case("encoded-hash-in-query", "https://app.example.com/cb?next=%23x", WEB, "RU003", False)

# RU004 wildcard (RFC 9700 §4.1.3)
for _id, _uri in [
    ("host", "https://*.example.com/cb"),
    ("path", "https://app.example.com/*"),
    ("query", "https://app.example.com/cb?tenant=*"),
    ("port", "https://app.example.com:*/cb"),
    ("fragment", "https://app.example.com/cb#*"),
    ("encoded-host-upper", "https://%2A.example.com/cb"),
    ("encoded-host-lower", "https://%2a.example.com/cb"),
    ("bare", "*"),
    ("rfc9700-4.1.1-pattern", "https://*.somesite.example/*"),
    ("not-a-uri", "https://*.exa mple.com/"),
]:
    case(_id, _uri, WEB, "RU004", True)
case("none", "https://app.example.com/cb", WEB, "RU004", False)
case("encoded-in-path-is-literal", "https://app.example.com/%2A", WEB, "RU004", False)

# RU005 userinfo (RFC 9110 §4.2.4)
case("user", "https://user@app.example.com/cb", WEB, "RU005", True)
case("user-password", "https://user:pass@app.example.com/cb", WEB, "RU005", True)
case("empty-at", "https://@app.example.com/cb", WEB, "RU005", True)
case("trusted-looking", "https://app.example.com@evil.example/cb", WEB, "RU005", True)
case("native-loopback", "http://u@127.0.0.1/cb", NATIVE, "RU005", True)
case("relative", "//u@app.example.com/cb", WEB, "RU005", True)
case("none", "https://app.example.com/cb", WEB, "RU005", False)
case("at-in-path", "https://app.example.com/@team/cb", WEB, "RU005", False)
case("at-in-query", "https://app.example.com/cb?email=a@b.example", WEB, "RU005", False)

# RU006 forbidden-scheme
for _id, _uri in [
    ("javascript", "javascript:alert(1)"),
    ("javascript-mixed-case", "JavaScript:alert(1)"),
    ("vbscript", "vbscript:msgbox(1)"),
    ("data", "data:text/html;base64,PHNjcmlwdD4="),
    ("blob", "blob:https://app.example.com/0f1e"),
    ("file", "file:///tmp/cb.html"),
    ("about", "about:blank"),
]:
    case(_id, _uri, WEB, "RU006", True)
case("native-javascript", "javascript:alert(1)", NATIVE, "RU006", True)
case("https", "https://app.example.com/cb", WEB, "RU006", False)
case("scheme-containing-name", "com.example.javascript:/cb", NATIVE, "RU006", False)

# RU007 oob
case("oob", "urn:ietf:wg:oauth:2.0:oob", NATIVE, "RU007", True)
case("oob-auto", "urn:ietf:wg:oauth:2.0:oob:auto", NATIVE, "RU007", True)
case("oob-uppercase", "URN:IETF:WG:OAUTH:2.0:OOB", NATIVE, "RU007", True)
case("oob-web", "urn:ietf:wg:oauth:2.0:oob", WEB, "RU007", True)
case("oob-percent-encoded-dot", "urn:ietf:wg:oauth:2%2E0:oob", NATIVE, "RU007", True)
case("other-urn", "urn:ietf:wg:oauth:2.0:oobx", NATIVE, "RU007", False)
case("loopback", "http://127.0.0.1/cb", NATIVE, "RU007", False)

# RU008 https-required (web)
case("http", "http://app.example.com/cb", WEB, "RU008", True)
case("http-loopback", "http://127.0.0.1/cb", WEB, "RU008", True)
case("http-localhost", "http://localhost:3000/cb", WEB, "RU008", True)
case("private-use", "com.example.app:/cb", WEB, "RU008", True)
case("uppercase-http", "HTTP://app.example.com/cb", WEB, "RU008", True)
case("https", "https://app.example.com/cb", WEB, "RU008", False)
case("uppercase-https", "HTTPS://app.example.com/cb", WEB, "RU008", False)
case("native-http", "http://app.example.com/cb", NATIVE, "RU008", False)
case("forbidden-scheme-says-ru006", "javascript:alert(1)", WEB, "RU008", False)
case("oob-says-ru007", "urn:ietf:wg:oauth:2.0:oob", WEB, "RU008", False)

# RU009 http-not-loopback (native; RFC 8252 §7.3)
for _id, _uri in [
    ("public-host", "http://app.example.com/cb"),
    ("private-ip", "http://192.168.1.10:8080/cb"),
    ("127.0.0.2", "http://127.0.0.2/cb"),
    ("127.255.255.254", "http://127.255.255.254:9000/cb"),
    ("127.1-short-form", "http://127.1/cb"),
    ("hex-form", "http://0x7f000001/cb"),
    ("integer-form", "http://2130706433/cb"),
    ("ipv4-trailing-dot", "http://127.0.0.1./cb"),
    ("ipv6-not-loopback", "http://[::2]/cb"),
    ("ipv4-mapped-loopback", "http://[::ffff:127.0.0.1]/cb"),
    ("localhost-subdomain", "http://localhost.example.com/cb"),
    ("zero-address", "http://0.0.0.0/cb"),
]:
    case(_id, _uri, NATIVE, "RU009", True)
for _id, _uri in [
    ("ipv4-loopback", "http://127.0.0.1/cb"),
    ("ipv4-loopback-port", "http://127.0.0.1:51004/oauth2redirect/example-provider"),
    ("ipv6-loopback", "http://[::1]:61023/oauth2redirect/example-provider"),
    ("ipv6-loopback-long", "http://[0:0:0:0:0:0:0:1]/cb"),
    ("ipv6-loopback-zeros", "http://[0000::0001]:8080/cb"),
    ("uppercase-scheme", "HTTP://127.0.0.1/cb"),
    ("explicit-default-port", "http://127.0.0.1:80/cb"),
    ("encoded-dot-is-127.0.0.1", "http://127%2E0.0.1/cb"),
    ("localhost-is-ru010", "http://localhost/cb"),
    ("claimed-https", "https://app.example.com/oauth2redirect"),
    ("private-use", "com.example.app:/cb"),
]:
    case(_id, _uri, NATIVE, "RU009", False)
case("web-http", "http://app.example.com/cb", WEB, "RU009", False)

# RU010 localhost-name (native; RFC 8252 §8.3)
for _id, _uri in [
    ("http", "http://localhost:8080/cb"),
    ("uppercase", "http://LOCALHOST/cb"),
    ("trailing-dot", "http://localhost./cb"),
    ("mixed-case-trailing-dot", "http://LocalHost.:3000/cb"),
    ("https", "https://localhost/cb"),
]:
    case(_id, _uri, NATIVE, "RU010", True)
case("ipv4-literal", "http://127.0.0.1:8080/cb", NATIVE, "RU010", False)
case("localhost-subdomain", "http://localhost.example.com/cb", NATIVE, "RU010", False)
case("web-https-localhost", "https://localhost/cb", WEB, "RU010", False)

# RU011 https-loopback (native; RFC 8252 §7.3)
case("ipv4", "https://127.0.0.1:8443/cb", NATIVE, "RU011", True)
case("ipv6", "https://[::1]/cb", NATIVE, "RU011", True)
case("ipv6-long", "https://[0:0:0:0:0:0:0:1]/cb", NATIVE, "RU011", True)
case("other-127", "https://127.0.0.2/cb", NATIVE, "RU011", True)
case("http-loopback", "http://127.0.0.1/cb", NATIVE, "RU011", False)
case("claimed-https", "https://app.example.com/cb", NATIVE, "RU011", False)
case("web", "https://127.0.0.1/cb", WEB, "RU011", False)

# RU012 private-scheme-not-reverse-domain (native; RFC 8252 §7.1, §8.4)
case("no-dot", "myapp:/callback", NATIVE, "RU012", True)
case("no-dot-two-slashes", "myapp://callback", NATIVE, "RU012", True)
case("uppercase", "MYAPP:/callback", NATIVE, "RU012", True)
case("non-oob-urn", "urn:example:callback", NATIVE, "RU012", True)
case("ftp", "ftp://files.example.com/", NATIVE, "RU012", True)
case("reverse-domain", "com.example.app:/oauth2redirect/example-provider", NATIVE, "RU012", False)
case("reverse-domain-mixed-case", "Com.Example.App:/cb", NATIVE, "RU012", False)
case("forbidden-is-ru006", "javascript:alert(1)", NATIVE, "RU012", False)
case("oob-is-ru007", "urn:ietf:wg:oauth:2.0:oob", NATIVE, "RU012", False)
case("web-is-ru008", "myapp:/callback", WEB, "RU012", False)

# RU013 private-scheme-form (native; RFC 8252 §7.1)
case("two-slashes", "com.example.app://callback", NATIVE, "RU013", True)
case("three-slashes", "com.example.app:///callback", NATIVE, "RU013", True)
case("no-slash", "com.example.app:callback", NATIVE, "RU013", True)
case("empty-path", "com.example.app:", NATIVE, "RU013", True)
case("no-dot-two-slashes", "myapp://callback", NATIVE, "RU013", True)
case("one-slash", "com.example.app:/callback", NATIVE, "RU013", False)
case("root", "com.example.app:/", NATIVE, "RU013", False)
case("with-query", "com.example.app:/cb?x=1", NATIVE, "RU013", False)
case("web", "com.example.app://callback", WEB, "RU013", False)
case("loopback", "http://127.0.0.1/cb", NATIVE, "RU013", False)

# RU014 not-normalized (RFC 3986 §6.2.2-§6.2.3)
for _id, _uri, _app in [
    ("uppercase-scheme", "HTTPS://app.example.com/cb", WEB),
    ("uppercase-host", "https://App.Example.com/cb", WEB),
    ("default-port", "https://app.example.com:443/cb", WEB),
    ("empty-port", "https://app.example.com:/cb", WEB),
    ("empty-path", "https://app.example.com", WEB),
    ("dot-segment", "https://app.example.com/a/./cb", WEB),
    ("encoded-unreserved", "https://app.example.com/%7Euser", WEB),
    ("lowercase-hex", "https://app.example.com/a%2fb", WEB),
    ("ipv6-long", "http://[0:0:0:0:0:0:0:1]/cb", NATIVE),
    ("ipv6-uppercase", "http://[::FFFF:7F00:1]/cb", NATIVE),
    ("loopback-default-port", "http://127.0.0.1:80/cb", NATIVE),
]:
    case(_id, _uri, _app, "RU014", True)
for _id, _uri, _app in [
    ("normalized", "https://app.example.com/cb", WEB),
    ("trailing-slash", "https://app.example.com/cb/", WEB),
    ("empty-query", "https://app.example.com/cb?", WEB),
    ("query-order", "https://app.example.com/cb?b=2&a=1", WEB),
    ("path-case", "https://app.example.com/CallBack", WEB),
    ("encoded-reserved", "https://app.example.com/a%2Fb", WEB),
    ("ipv6-loopback", "http://[::1]:8080/cb", NATIVE),
    ("private-use", "com.example.app:/cb", NATIVE),
    ("relative-has-no-normal-form", "/CB/../x", WEB),
    ("not-a-uri", "HTTPS://app.example.com/ cb", WEB),
]:
    case(_id, _uri, _app, "RU014", False)

# RU016 too-long-for-grant
case("256", _sized(256), WEB, "RU016", True)
case("5000", _sized(5000), WEB, "RU016", True)
case("small-column", "https://app.example.com/cb", WEB, "RU016", True, 20)
case("not-a-uri", " " + _sized(300), WEB, "RU016", True)
case("255", _sized(255), WEB, "RU016", False)
case("unlimited", _sized(5000), WEB, "RU016", False, None)
case("short", "https://app.example.com/cb", WEB, "RU016", False)

# RU001: hosts that percent-decode to a delimiter, a control character or an IDN (issue 11).
for _id, _uri in [
    ("pct-at", "https://app.example.com%40evil.example/cb"),
    ("pct-slash", "https://app.example.com%2Fevil.example/cb"),
    ("pct-slash-lower", "https://app.example.com%2fevil.example/cb"),
    ("pct-colon", "https://app.example.com%3A8443/cb"),
    ("pct-hash", "https://app.example.com%23.evil.example/cb"),
    ("pct-backslash", "https://app.example.com%5C.evil.example/cb"),
    ("pct-question", "https://app.example.com%3F.evil.example/cb"),
    ("pct-nul", "https://app.example.com%00.evil.example/cb"),
    ("pct-space", "https://app%20.example.com/cb"),
    ("pct-tab", "https://app%09.example.com/cb"),
    ("pct-del", "https://app%7F.example.com/cb"),
    ("pct-percent", "https://app%25.example.com/cb"),
    ("pct-brackets", "https://%5B::1%5D/cb"),
    ("pct-sub-delim-semicolon", "https://app%3B.example.com/cb"),
    ("pct-sub-delim-ampersand", "https://app%26evil.example/cb"),
    ("pct-quote", "https://app%22.example.com/cb"),
    ("pct-idn-euro", "https://%E2%82%AC.example/cb"),
    ("pct-idn-umlaut", "https://b%C3%BCcher.example/cb"),
    ("pct-not-utf8", "https://%FF.example/cb"),
    ("pct-fullwidth-digits", "https://%EF%BC%91%EF%BC%92%EF%BC%97.0.0.1/cb"),
]:
    case(_id, _uri, WEB, "RU001", True)
    case(_id + "-native", _uri, NATIVE, "RU001", True)
case("private-use-pct-at", "com.example.app://a%40b/cb", NATIVE, "RU001", True)
for _id, _uri in [
    ("pct-unreserved-in-host", "https://%61pp.example.com/cb"),
    ("pct-dot-in-host", "https://app%2Eexample.com/cb"),
    ("pct-at-in-path", "https://app.example.com/%40team"),
    ("pct-slash-in-query", "https://app.example.com/cb?next=%2F"),
    ("pct-star-is-ru004", "https://%2A.example.com/cb"),
]:
    case(_id, _uri, WEB, "RU001", False)

# RU004: '*' only where a server could read it as a pattern (issue 11).
case("path-middle", "https://app.example.com/a*b/cb", WEB, "RU004", True)
case("query-last-char", "https://app.example.com/cb?x=1&y=*", WEB, "RU004", True)
case("scheme", "http*://app.example.com/cb", WEB, "RU004", True)
case("userinfo", "https://*@app.example.com/cb", WEB, "RU004", True)
case("query-literal", "https://app.example.com/cb?scope=a*b&x=1", WEB, "RU004", False)
case("query-literal-native", "com.example.app:/cb?v=*1", NATIVE, "RU004", False)
case("pct-in-query-literal", "https://app.example.com/cb?x=%2A", WEB, "RU004", False)

# RU017 non-canonical-ipv4 (WHATWG URL IPv4 parser; issue 11).
for _id, _uri in [
    ("short-127.1", "https://127.1/cb"),
    ("hex-int", "https://0x7f000001/cb"),
    ("decimal-int", "https://2130706433/cb"),
    ("octal-part", "https://0177.0.0.1/cb"),
    ("leading-zero", "https://127.000.000.001/cb"),
    ("mixed-hex-octal", "https://0x7f.0.0.01/cb"),
    ("hex-parts", "https://0x7F.0x0.0x0.0x1/cb"),
    ("three-parts", "https://127.0.1/cb"),
    ("trailing-dot", "https://127.0.0.1./cb"),
    ("short-trailing-dot", "https://127.1./cb"),
    ("public-short", "https://8.8.2056/cb"),
    ("bare-zero", "https://0/cb"),
    ("bare-0x", "https://0x/cb"),
    ("uppercase-hex-prefix", "https://0X7F000001/cb"),
    ("http", "http://0x7f000001:8080/cb"),
]:
    case(_id, _uri, WEB, "RU017", True)
    case(_id + "-native", _uri, NATIVE, "RU017", True)
for _id, _uri, _app in [
    ("canonical", "https://127.0.0.1/cb", WEB),
    ("canonical-native", "http://127.0.0.1/cb", NATIVE),
    ("canonical-public", "https://192.0.2.10/cb", WEB),
    ("pct-encoded-canonical", "http://127%2E0.0.1/cb", NATIVE),
    ("name", "https://app.example.com/cb", WEB),
    ("digit-labels-then-name", "https://1.2.3.example/cb", WEB),
    ("ipv6", "http://[::1]/cb", NATIVE),
    ("private-use-authority", "com.example.app://127.1/cb", NATIVE),
    ("not-a-number", "https://0x7g.example/cb", WEB),
]:
    case(_id, _uri, _app, "RU017", False)

# RU018 invalid-host (issue 11).
_LABEL63 = "a" * 63
_HOST253 = ".".join([_LABEL63] * 3 + ["b" * 61])  # 63*3 + 61 + 3 dots = 253
for _id, _uri in [
    ("octet-256", "https://256.256.256.256/cb"),
    ("five-parts", "https://1.2.3.4.5/cb"),
    ("bad-octal", "https://1.2.3.09/cb"),
    ("last-too-big", "https://1.16777216/cb"),
    ("numeric-tld", "https://app.example.123/cb"),
    ("hex-tld", "https://app.example.0x1/cb"),
    ("ipvfuture", "https://[v1.fe80::1]/cb"),
    ("ipvfuture-short", "https://[v1.x]/cb"),
    ("bad-punycode", "https://xn--zz.example/cb"),
    ("punycode-ends-hyphen", "https://xn--abc-.example/cb"),
    ("punycode-disallowed", "https://xn--lzg.example/cb"),
    ("empty-a-label", "https://xn--.example/cb"),
    ("leading-hyphen", "https://-app.example.com/cb"),
    ("trailing-hyphen", "https://app-.example.com/cb"),
    ("hyphen-tld", "https://app.example.com-/cb"),
    ("empty-label", "https://app..example.com/cb"),
    ("leading-dot", "https://.app.example.com/cb"),
    ("two-trailing-dots", "https://app.example.com../cb"),
    ("only-dot", "https://./cb"),
    ("label-64", "https://" + "a" * 64 + ".example.com/cb"),
    ("host-254", "https://a" + _HOST253 + "/cb"),
    ("host-300", "https://" + ".".join(["a" * 50] * 6) + "/cb"),
]:
    case(_id, _uri, WEB, "RU018", True)
    case(_id + "-native", _uri, NATIVE, "RU018", True)
case("ipvfuture-private-use", "com.example.app://[v1.x]/cb", NATIVE, "RU018", True)
for _id, _uri in [
    ("plain", "https://app.example.com/cb"),
    ("label-63", "https://" + _LABEL63 + ".example.com/cb"),
    ("host-253", "https://" + _HOST253 + "/cb"),
    ("host-253-and-root-dot", "https://" + _HOST253 + "./cb"),
    ("root-dot", "https://app.example.com./cb"),
    ("inner-hyphens", "https://my-app.ex-ample.com/cb"),
    ("reserved-ldh-label", "https://ab--cd.example/cb"),
    ("underscore", "https://my_app.example.com/cb"),
    ("valid-a-label", "https://xn--bcher-kva.example/cb"),
    ("uppercase-a-label", "https://XN--BCHER-KVA.example/cb"),
    ("single-label", "https://intranet/cb"),
    ("ipv4", "https://192.0.2.1/cb"),
    ("ipv6", "https://[2001:db8::1]/cb"),
    ("non-canonical-ipv4-is-ru017", "https://127.1/cb"),
]:
    case(_id, _uri, WEB, "RU018", False)
case("private-use-host-hyphen", "com.example.app://-x/cb", NATIVE, "RU018", False)
case("localhost-dot", "http://localhost./cb", NATIVE, "RU018", False)

# RU019 secret-parameter (issue 22): names compared percent-decoded, case-insensitively, in
# the query and the fragment, also on text that is not a URI.
for _id, _uri in [
    ("client-secret", "https://app.example.com/cb?client_secret=s3"),
    ("access-token", "https://app.example.com/cb?a=1&access_token=x"),
    ("refresh-token-semicolon", "https://app.example.com/cb?a=1;refresh_token=x"),
    ("id-token-fragment", "https://app.example.com/cb#id_token=x"),
    ("fragment-route-query", "https://app.example.com/cb#/done?token=x"),
    ("password-upper", "https://app.example.com/cb?PASSWORD=x"),
    ("passwd", "https://app.example.com/cb?passwd=x"),
    ("pwd", "https://app.example.com/cb?pwd=x"),
    ("secret", "https://app.example.com/cb?secret=x"),
    ("code", "https://app.example.com/cb?code=x"),
    ("api-key", "https://app.example.com/cb?api_key=x"),
    ("apikey-camel", "https://app.example.com/cb?apiKey=x"),
    ("x-api-key", "https://app.example.com/cb?X-Api-Key=x"),
    ("key", "https://app.example.com/cb?key=x"),
    ("assertion", "https://app.example.com/cb?client_assertion=x"),
    ("amz-signature", "https://app.example.com/cb?X-Amz-Signature=x"),
    ("percent-encoded-name", "https://app.example.com/cb?client%5Fsecret=x"),
    ("double-encoded-name", "https://app.example.com/cb?client%255Fsecret=x"),
    ("hyphen-case", "https://app.example.com/cb?Client-Secret=x"),
    ("private-use", "com.example.app:/cb?token=x"),
    ("not-a-uri", "https://app.example.com/cb?token=x y"),
]:
    case(_id, _uri, WEB, "RU019", True)
case("native-loopback", "http://127.0.0.1/cb?access_token=x", NATIVE, "RU019", True)
for _id, _uri in [
    ("plain", "https://app.example.com/cb"),
    ("state", "https://app.example.com/cb?state=x&tenant=eu"),
    ("token-type", "https://app.example.com/cb?token_type=bearer&expires_in=3600"),
    ("empty-value", "https://app.example.com/cb?token="),
    ("no-value", "https://app.example.com/cb?token"),
    ("name-in-path", "https://app.example.com/token/cb"),
    ("code-challenge-method", "https://app.example.com/cb?code_challenge_method=S256"),
    ("monkey", "https://app.example.com/cb?monkey=1"),
    ("value-named-token", "https://app.example.com/cb?kind=token"),
]:
    case(_id, _uri, WEB, "RU019", False)

# Every URI the issue names, with both app types: the exact codes and the verdict.
ISSUE_CASES: list[Any] = []
for _uri, _web, _native in [
    ("https://app.example.com%40evil.example/cb", ("RU001",), ("RU001",)),
    ("https://app.example.com%2Fevil.example/cb", ("RU001",), ("RU001",)),
    ("https://app.example.com%3Aevil.example/cb", ("RU001",), ("RU001",)),
    ("https://app.example.com%23evil.example/cb", ("RU001",), ("RU001",)),
    ("https://app.example.com%5Cevil.example/cb", ("RU001",), ("RU001",)),
    ("https://app.example.com%3Fevil.example/cb", ("RU001",), ("RU001",)),
    ("https://app.example.com%00evil.example/cb", ("RU001",), ("RU001",)),
    ("https://127.1/cb", ("RU017",), ("RU017",)),
    ("https://0x7f000001/cb", ("RU017",), ("RU017",)),
    ("https://2130706433/cb", ("RU017",), ("RU017",)),
    ("https://0177.0.0.1/cb", ("RU017",), ("RU017",)),
    ("https://127.0.0.1/cb", (), ("RU011",)),
    ("http://127.1/cb", ("RU008", "RU017"), ("RU009", "RU017")),
    ("https://256.256.256.256/cb", ("RU018",), ("RU018",)),
    ("https://[v1.fe80::1]/cb", ("RU018",), ("RU018",)),
    ("https://xn--zz.example/cb", ("RU018",), ("RU018",)),
    ("https://-app.example.com/cb", ("RU018",), ("RU018",)),
    ("https://app-.example.com/cb", ("RU018",), ("RU018",)),
    ("https://app..example.com/cb", ("RU018",), ("RU018",)),
    ("https://" + "a" * 64 + ".example/cb", ("RU018",), ("RU018",)),
    # A host over 253 characters makes the URI longer than varchar(255) too: RU016 as well.
    ("https://" + ".".join(["a" * 50] * 5) + ".example/cb", ("RU016", "RU018"), ("RU016", "RU018")),
    ("https://" + ".".join(["a" * 63] * 4) + ".example/cb", ("RU016", "RU018"), ("RU016", "RU018")),
    ("https://bücher.example/cb", ("RU001",), ("RU001",)),
    ("https://%E2%82%AC.example/cb", ("RU001",), ("RU001",)),
    ("https://xn--bcher-kva.example/cb", (), ()),
    ("com.example.app:", ("RU008",), ("RU013",)),
    ("https://app.example.com/cb?tenant=*", ("RU004",), ("RU004",)),
    ("https://app.example.com/cb?scope=a*b&x=1", (), ()),
]:
    for _app, _codes in ((WEB, _web), (NATIVE, _native)):
        _severities = {RULES[c].severity for c in _codes}
        _verdict = (
            "fail"
            if Severity.ERROR in _severities
            else "warn"
            if Severity.WARNING in _severities
            else "pass"
        )
        ISSUE_CASES.append(pytest.param(_uri, _app, _codes, _verdict, id=f"{_app}-{_uri[:60]}"))


@pytest.mark.parametrize(("uri", "app", "codes", "verdict"), ISSUE_CASES)
def test_issue_11_uris(uri: str, app: AppType, codes: tuple[str, ...], verdict: str) -> None:
    report = check_uri(uri, app)
    assert tuple(f.code for f in report.findings) == codes
    assert report.verdict == verdict


@pytest.mark.parametrize(
    ("uri", "fragments"),
    [
        pytest.param(
            "https://bücher.example/cb",
            ["non-ASCII character U+00FC", "https://xn--bcher-kva.example/cb"],
            id="iri",
        ),
        pytest.param(
            "https://b%C3%BCcher.example/cb",
            ["bücher.example", "https://xn--bcher-kva.example/cb"],
            id="pct-idn",
        ),
        pytest.param(
            "https://%E2%82%AC.example/cb", ["xn--lzg.example", "IDNA2008"], id="pct-euro"
        ),
        pytest.param("https://ｅxample.com/cb", ["https://example.com/cb"], id="fullwidth"),
        pytest.param(
            "https://app.example.com%40evil.example/cb", ["%40", "'@'"], id="pct-delimiter"
        ),
        pytest.param("https://app.example.com%00x/cb", ["NUL"], id="pct-nul"),
    ],
)
def test_host_messages_say_what_a_browser_sees(uri: str, fragments: list[str]) -> None:
    (finding,) = check_uri(uri, WEB).findings
    assert finding.code == "RU001"
    for fragment in fragments:
        assert fragment in finding.message


@pytest.mark.parametrize(
    ("uri", "app", "code", "fragment"),
    [
        pytest.param("https://0x7f000001/cb", WEB, "RU017", "127.0.0.1", id="ru017-address"),
        pytest.param("https://8.8.2056/cb", WEB, "RU017", "8.8.8.8", id="ru017-public"),
        pytest.param("http://127.1/cb", NATIVE, "RU009", "127.0.0.1", id="ru009-loopback"),
        pytest.param("https://xn--zz.example/cb", WEB, "RU018", "xn--zz", id="ru018-alabel"),
        pytest.param("https://[v1.x]/cb", WEB, "RU018", "IPvFuture", id="ru018-ipvfuture"),
        pytest.param("com.example.app:", NATIVE, "RU013", "no path", id="ru013-empty-path"),
    ],
)
def test_host_rule_messages(uri: str, app: AppType, code: str, fragment: str) -> None:
    messages = [f.message for f in check_uri(uri, app).findings if f.code == code]
    assert len(messages) == 1 and fragment in messages[0], messages


@pytest.mark.parametrize(("uri", "app", "code", "fires", "grant_column_length"), URI_CASES)
def test_uri_rule(
    uri: str, app: AppType, code: str, fires: bool, grant_column_length: int | None
) -> None:
    report = check_uri(uri, app, grant_column_length=grant_column_length)
    codes = [f.code for f in report.findings]
    assert (code in codes) is fires, codes


EXACT: list[Any] = [
    pytest.param("https://app.example.com/cb", WEB, (), "pass", id="clean-web"),
    pytest.param("http://127.0.0.1:8080/cb", NATIVE, (), "pass", id="clean-loopback"),
    pytest.param("http://[::1]/cb", NATIVE, (), "pass", id="clean-ipv6-loopback"),
    pytest.param("com.example.app:/cb", NATIVE, (), "pass", id="clean-private-use"),
    pytest.param("https://app.example.com/cb", NATIVE, (), "pass", id="claimed-https-native"),
    pytest.param("http://localhost/cb", NATIVE, ("RU010",), "warn", id="localhost-only-ru010"),
    pytest.param("https://App.example.com/cb", WEB, ("RU014",), "pass", id="info-does-not-warn"),
    pytest.param("https:/x", WEB, ("RU001",), "fail", id="https-without-host"),
    pytest.param("", WEB, ("RU001",), "fail", id="empty"),
    pytest.param(_sized(5000), WEB, ("RU016",), "warn", id="5000-chars"),
    pytest.param("/cb#x", WEB, ("RU002", "RU003"), "fail", id="relative-skips-scheme-rules"),
    pytest.param("myapp://cb", NATIVE, ("RU012", "RU013"), "fail", id="short-scheme-two-slashes"),
    pytest.param(
        "https://u@*.example.com/cb#",
        WEB,
        ("RU003", "RU004", "RU005"),
        "fail",
        id="findings-in-code-order",
    ),
    pytest.param(
        "https://app.example.com:*/" + "x" * 300,
        WEB,
        ("RU001", "RU004", "RU016"),
        "fail",
        id="not-a-uri-keeps-raw-text-rules",
    ),
    pytest.param("javascript:alert(1)", NATIVE, ("RU006",), "fail", id="javascript-native"),
    pytest.param(
        "https://app.example.com/*/../cb",
        WEB,
        ("RU004", "RU014"),
        "fail",
        id="star-in-dot-segment-still-fails",
    ),
    pytest.param("urn:ietf:wg:oauth:2.0:oob", WEB, ("RU007",), "fail", id="oob-web"),
]


@pytest.mark.parametrize(("uri", "app", "codes", "verdict"), EXACT)
def test_uri_report(uri: str, app: AppType, codes: tuple[str, ...], verdict: str) -> None:
    report = check_uri(uri, app)
    assert tuple(f.code for f in report.findings) == codes
    assert report.verdict == verdict
    for finding in report.findings:
        rule = RULES[finding.code]
        assert (finding.name, finding.severity) == (rule.name, rule.severity)
        assert finding.message


def test_uri_report_fields_and_json_shape() -> None:
    report = check_uri("HTTPS://App.Example.com:443", "web")
    assert report.uri == "HTTPS://App.Example.com:443"
    assert report.app_type is AppType.WEB
    assert report.normalized == "https://app.example.com/"
    assert json.loads(json.dumps(asdict(report))) == {
        "uri": "HTTPS://App.Example.com:443",
        "app_type": "web",
        "verdict": "pass",
        "normalized": "https://app.example.com/",
        "findings": [
            {
                "code": "RU014",
                "name": "not-normalized",
                "severity": "info",
                "message": "normalized form is https://app.example.com/",
            }
        ],
    }


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        pytest.param(
            "https://app.example.com/\tcb", "control character (tab) at position 24", id="tab"
        ),
        pytest.param(
            "https://app.example.com/%zz", "invalid percent-encoding at position 24", id="pct"
        ),
        pytest.param("https://[::1::]/", "invalid IPv6 literal", id="ipv6"),
        pytest.param("https://app.example.com:8o/", "port is not numeric", id="port"),
        pytest.param("https:/x", "https URI without a host", id="no-host"),
        pytest.param("ｈttps://x/", "non-ASCII character U+FF48 at position 0", id="fullwidth"),
        pytest.param("", "empty value", id="empty"),
    ],
)
def test_not_a_uri_message_is_precise(uri: str, reason: str) -> None:
    (finding,) = check_uri(uri, WEB).findings
    assert finding.code == "RU001"
    assert reason in finding.message


def test_no_normalized_form_without_a_scheme_or_host() -> None:
    assert check_uri("/cb", WEB).normalized is None
    assert check_uri("https:/x", WEB).normalized is None
    assert check_uri("https://a b/", WEB).normalized is None


def test_unknown_app_type_is_rejected() -> None:
    with pytest.raises(ValueError):
        check_uri("https://app.example.com/cb", "desktop")


def test_severity_and_app_type_are_strings() -> None:
    assert isinstance(Severity.ERROR, str)
    assert str(Severity.ERROR) == "error"
    assert f"{AppType.NATIVE}" == "native"
    assert check_uri("http://127.0.0.1/", "native").app_type is AppType.NATIVE


# --- application cases ------------------------------------------------------------------------

APP_CASES: list[Any] = []


def app_case(case_id: str, code: str, fires: bool, text: str | None, **kwargs: Any) -> None:
    verb = "fires" if fires else "quiet"
    kwargs.setdefault("app_type", WEB)
    kwargs.setdefault("has_secret", False)
    APP_CASES.append(pytest.param(text, kwargs, code, fires, id=f"{code}-{verb}-{case_id}"))


app_case("case-and-port", "RU015", True, "https://a.example/cb\nHTTPS://a.example:443/cb")
app_case("identical", "RU015", True, "https://a.example/cb\nhttps://a.example/cb")
app_case("identical-invalid", "RU015", True, "a b\na b")
app_case("after-stripping", "RU015", True, "https://a.example/cb\n  https://a.example/cb\r")
app_case("trailing-slash-differs", "RU015", False, "https://a.example/cb\nhttps://a.example/cb/")
app_case("query-differs", "RU015", False, "https://a.example/cb?a=1\nhttps://a.example/cb?a=2")
app_case("path-case-differs", "RU015", False, "https://a.example/cb\nhttps://a.example/CB")

app_case("none", "RU101", True, None)
app_case("empty", "RU101", True, "")
app_case("blank-lines", "RU101", True, "\n \r\n\t\n")
app_case("one", "RU101", False, "https://a.example/cb")
app_case("no-code-grant", "RU101", False, "", can_use_code_grant=False)
app_case("only-invalid", "RU101", False, "not a uri")

app_case("https-and-loopback", "RU102", True, "https://a.example/cb\nhttp://127.0.0.1/cb")
app_case("https-and-private-use", "RU102", True, "https://a.example/cb\ncom.example.app:/cb")
app_case(
    "http-and-localhost", "RU102", True, "http://a.example/cb\nhttp://localhost/cb", app_type=NATIVE
)
app_case("all-web", "RU102", False, "https://a.example/cb\nhttp://b.example/cb")
app_case("all-native", "RU102", False, "http://127.0.0.1/cb\ncom.example.app:/cb", app_type=NATIVE)
app_case("unknown-is-neutral", "RU102", False, "https://a.example/cb\njavascript:x\n/cb")

app_case(
    "removed-uri", "RU103", True, "https://a.example/cb", live_grant_uris=["https://old.example/cb"]
)
app_case(
    "not-byte-identical",
    "RU103",
    True,
    "https://a.example/cb",
    live_grant_uris=["https://a.example/cb/"],
)
app_case(
    "case-differs", "RU103", True, "https://a.example/cb", live_grant_uris=["HTTPS://a.example/cb"]
)
app_case(
    "registered", "RU103", False, "https://a.example/cb", live_grant_uris=["https://a.example/cb"]
)
app_case(
    "registered-with-whitespace",
    "RU103",
    False,
    "  https://a.example/cb\r\n",
    live_grant_uris=["https://a.example/cb"],
)
app_case("no-grants", "RU103", False, "https://a.example/cb")

app_case("native-secret", "RU104", True, "http://127.0.0.1/cb", app_type=NATIVE, has_secret=True)
app_case("native-public", "RU104", False, "http://127.0.0.1/cb", app_type=NATIVE)
app_case("web-secret", "RU104", False, "https://a.example/cb", has_secret=True)

app_case("web-stored-native-uris", "RU111", True, "http://127.0.0.1/cb\ncom.example.app:/cb")
app_case("native-stored-web-uri", "RU111", True, "https://a.example/cb", app_type=NATIVE)
app_case("web-stored-web-uri", "RU111", False, "https://a.example/cb")
app_case("native-stored-native", "RU111", False, "http://127.0.0.1/cb", app_type=NATIVE)
app_case("mixed-is-ru102", "RU111", False, "https://a.example/cb\nhttp://127.0.0.1/cb")
app_case("no-uris", "RU111", False, "")

app_case("blank-line", "RU014", True, "https://a.example/cb\n\nhttps://b.example/cb")
app_case("crlf", "RU014", True, "https://a.example/cb\r\nhttps://b.example/cb")
app_case("surrounding-spaces", "RU014", True, "  https://a.example/cb\t")
app_case("clean", "RU014", False, "https://a.example/cb\nhttps://b.example/cb")
app_case("final-newline", "RU014", False, "https://a.example/cb\n")


@pytest.mark.parametrize(("text", "kwargs", "code", "fires"), APP_CASES)
def test_application_rule(text: str | None, kwargs: dict[str, Any], code: str, fires: bool) -> None:
    report = check_application(text, **kwargs)
    codes = [f.code for f in report.all_findings()]
    assert (code in codes) is fires, codes


def test_application_report() -> None:
    text = "https://a.example/cb\r\n\n  HTTPS://a.example:443/cb \nhttp://127.0.0.1/cb\n"
    report = check_application(
        text,
        "web",
        has_secret=True,
        live_grant_uris=[
            "https://old.example/cb",
            "https://a.example/cb",
            "https://old.example/cb",
        ],
    )
    assert [r.uri for r in report.uris] == [
        "https://a.example/cb",
        "HTTPS://a.example:443/cb",
        "http://127.0.0.1/cb",
    ]
    assert [(f.code, f.uri) for f in report.findings] == [
        ("RU014", None),  # blank line 2
        ("RU015", "HTTPS://a.example:443/cb"),
        ("RU102", None),
        ("RU103", "https://old.example/cb"),  # reported once
    ]
    assert "line 3 repeats line 1" in report.findings[1].message
    assert report.findings[1].normalized == "https://a.example/cb"
    assert report.verdict == "fail"  # http://127.0.0.1 in a web app: RU008
    assert [f.code for f in report.uris[0].findings] == ["RU014"]
    assert [f.code for f in report.uris[1].findings] == ["RU014", "RU014"]
    assert [f.code for f in report.uris[2].findings] == ["RU008"]
    flat = report.all_findings()
    assert len(flat) == 4 + 4
    assert flat[0].uri == "https://a.example/cb"


def test_findings_carry_their_line_of_redirect_uris() -> None:
    text = "https://a.example/cb\n\n HTTPS://a.example/cb\nhttp://127.1/cb\n\n"
    report = check_application(
        text, "web", has_secret=False, live_grant_uris=["https://gone.example/cb"]
    )
    assert report.lines == (1, 3, 4)
    assert [(f.code, f.line) for f in report.all_findings()] == [
        ("RU014", 3),  # whitespace
        ("RU014", 3),  # case
        ("RU008", 4),
        ("RU017", 4),
        ("RU014", 2),  # blank lines
        ("RU014", 5),
        ("RU015", 3),
        ("RU103", None),  # a live grant's URI is on no line
    ]


def test_application_uri_reports_match_check_uri() -> None:
    uris = ["https://a.example/cb", "http://127.0.0.1:9/cb", "myapp://x", "https:/x", _sized(300)]
    report = check_application("\n".join(uris), "native", has_secret=False)
    assert report.uris == tuple(check_uri(uri, "native") for uri in uris)


def test_application_verdict() -> None:
    assert check_application("https://a.example/cb", "web", has_secret=False).verdict == "pass"
    assert check_application("", "web", has_secret=False).verdict == "fail"
    mixed = "https://a.example/cb\ncom.example.app:/cb"
    assert check_application(mixed, "native", has_secret=False).verdict == "warn"


def test_every_rule_has_a_firing_and_a_quiet_case() -> None:
    seen: dict[tuple[str, bool], int] = {}
    for param in URI_CASES:
        _uri, _app, code, fires, _length = param.values
        seen[(code, fires)] = seen.get((code, fires), 0) + 1
    for param in APP_CASES:
        _text, _kwargs, code, fires = param.values
        seen[(code, fires)] = seen.get((code, fires), 0) + 1
    for param in METADATA_CASES:  # RU105-RU110, tests/test_metadata_rules.py
        _urls, _kwargs, code, fires = param.values
        seen[(code, fires)] = seen.get((code, fires), 0) + 1
    missing = [
        (code, fires) for code in RULES for fires in (True, False) if (code, fires) not in seen
    ]
    assert missing == []


# --- app type inference -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "style"),
    [
        pytest.param("https://app.example.com/cb", "web", id="https"),
        pytest.param("https://127.0.0.1/cb", "native", id="https-loopback"),
        pytest.param("http://app.example.com/cb", "web", id="http-public"),
        pytest.param("http://127.0.0.1:8080/cb", "native", id="loopback-v4"),
        pytest.param("http://127.0.0.2/cb", "native", id="loopback-127-8"),
        pytest.param("http://[::1]/cb", "native", id="loopback-v6"),
        pytest.param("http://[0:0:0:0:0:0:0:1]/cb", "native", id="loopback-v6-long"),
        pytest.param("http://LOCALHOST./cb", "native", id="localhost"),
        pytest.param("com.example.app:/cb", "native", id="private-use"),
        pytest.param("myapp://cb", "native", id="private-use-no-dot"),
        pytest.param("urn:ietf:wg:oauth:2.0:oob", "native", id="oob"),
        pytest.param("http://127.1/cb", "web", id="127.1-is-a-name"),
        pytest.param("javascript:alert(1)", "unknown", id="forbidden"),
        pytest.param("/cb", "unknown", id="relative"),
        pytest.param("https:/x", "unknown", id="no-host"),
        pytest.param("not a uri", "unknown", id="garbage"),
    ],
)
def test_classify_uri_style(uri: str, style: str) -> None:
    assert classify_uri_style(uri) == style


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        pytest.param([], WEB, id="empty"),
        pytest.param(["https://a.example/cb"], WEB, id="web"),
        pytest.param(["http://127.0.0.1/cb", "com.example.app:/cb"], NATIVE, id="native"),
        pytest.param(["http://localhost:3000/cb"], NATIVE, id="localhost"),
        pytest.param(["http://127.0.0.1/cb", "https://a.example/cb"], WEB, id="mixed-is-web"),
        pytest.param(["com.example.app:/cb", "javascript:x", "  "], NATIVE, id="unknown-neutral"),
        pytest.param(["javascript:x"], WEB, id="only-unknown"),
        pytest.param([" http://127.0.0.1/cb\r"], NATIVE, id="stripped"),
    ],
)
def test_infer_app_type(uris: list[str], expected: AppType) -> None:
    assert infer_app_type(uris) is expected


def test_split_redirect_uris() -> None:
    assert split_redirect_uris(None) == []
    assert split_redirect_uris("") == []
    assert split_redirect_uris(" a \r\n\n\tb\n") == ["a", "b"]
    assert split_redirect_uris("a\u2028b\x0bc") == ["a\u2028b\x0bc"]  # only \n separates
    assert infer_app_type(split_redirect_uris("http://[::1]/\ncom.example.x:/y")) is NATIVE


# --- properties -------------------------------------------------------------------------------

_URI_ISH = st.from_regex(
    r"(?i:https?|com\.example\.app|myapp|urn|javascript|x)?:?(//)?"
    r"([a-zA-Z0-9@:%*\[\]._~-]|%2[aA]|%7[eE]|127\.0\.0\.1|\[::1\]|localhost\.?){0,12}"
    r"(/[a-zA-Z0-9.%*~-]{0,6}){0,4}(\?[a-z=&%*/?]{0,6})?(#[a-z]{0,3})?",
    fullmatch=True,
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(st.text(), _URI_ISH), st.sampled_from([WEB, NATIVE]), st.none() | st.integers(0, 300)
)
def test_check_uri_never_raises(uri: str, app: AppType, length: int | None) -> None:
    report = check_uri(uri, app, grant_column_length=length)
    assert report.verdict in ("pass", "warn", "fail")
    assert list(f.code for f in report.findings) == sorted(f.code for f in report.findings)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _URI_ISH), st.sampled_from([WEB, NATIVE]), st.booleans())
def test_check_application_never_raises(text: str, app: AppType, secret: bool) -> None:
    report = check_application(text, app, has_secret=secret, live_grant_uris=[text])
    assert report.verdict in ("pass", "warn", "fail")


_SEGMENT = st.sampled_from(["cb", "CB", ".", "..", "%7e", "%2F", "%2e", "a%41", "", "x;y=1", "@"])
_REDIRECT_LIKE = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(
        [
            "https://app.example.com",
            "HTTPS://App.Example.COM:443",
            "https://%61pp.example.com:0443",
            "http://127.0.0.1:8080",
            "http://[::1]",
            "http://[0:0:0:0:0:0:0:1]:53682",
            "http://LOCALHOST.",
            "https://127.0.0.1",
            "http://127%2E0.0.1",
            "https://127.1",
            "https://%30x7f000001",
            "http://0177.0.0.1.",
            "https://256.256.256.256",
            "https://xn--zz.example",
            "HTTPS://XN--BCHER-KVA.example",
            "https://b%c3%bccher.example",
            "https://app%40evil.example",
            "https://-app.example.com",
            "https://[v1.x]",
            "com.example.app:",
            "com.example.app://host",
            "myapp:",
            "urn:ietf:wg:oauth:2%2e0:",
            "javascript:",
        ]
    ),
    st.lists(_SEGMENT, max_size=4).map(lambda segs: "".join("/" + seg for seg in segs)),
    st.sampled_from(["", "?", "?a=1&b=%7e", "?next=/x/../y"]),
    st.sampled_from(["", "", "", "#", "#x"]),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_URI_ISH, _REDIRECT_LIKE), st.sampled_from([WEB, NATIVE]))
def test_normalized_form_gets_the_same_findings(uri: str, app: AppType) -> None:
    report = check_uri(uri, app, grant_column_length=None)
    if report.normalized is None:
        return
    again = check_uri(report.normalized, app, grant_column_length=None)
    assert again.normalized == report.normalized
    assert "RU014" not in {f.code for f in again.findings}
    expected = {f.code for f in report.findings} - {"RU014"}
    head = report.normalized.split("?", 1)[0].split("#", 1)[0]
    if "*" not in head and "%2A" not in head and not report.normalized.endswith("*"):
        # The "*" was in a dot segment (https://a.example/*/../cb) and any other one is a
        # literal inside the query or fragment, which RU004 leaves alone.
        expected.discard("RU004")
    assert {f.code for f in again.findings} - {"RU014"} == expected
    if report.verdict == "pass":
        assert again.verdict == "pass"
