"""RFC 3986 parsing and normalization (oauthmig.uri)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oauthmig.redirects.hosts import (
    a_label_form,
    browser_ipv4,
    dns_host_problem,
    ends_in_a_number,
    ipv4_text,
)
from oauthmig.uri import (
    ParsedURI,
    URIError,
    _parse_strict,
    normalize_uri,
    parse_uri,
    remove_dot_segments,
)

# --- parsing: accepted ------------------------------------------------------------------------

VALID: list[Any] = [
    pytest.param(
        "https://example.com/cb",
        {"scheme": "https", "host": "example.com", "host_kind": "reg-name", "path": "/cb"},
        id="plain-https",
    ),
    pytest.param(
        "https:/x",
        {"scheme": "https", "has_authority": False, "host": None, "path": "/x"},
        id="https-single-slash-has-no-authority",
    ),
    pytest.param("http://127.1/", {"host": "127.1", "host_kind": "reg-name"}, id="127.1-reg-name"),
    pytest.param(
        "http://0x7f000001/", {"host": "0x7f000001", "host_kind": "reg-name"}, id="hex-reg-name"
    ),
    pytest.param(
        "http://2130706433/", {"host": "2130706433", "host_kind": "reg-name"}, id="int-reg-name"
    ),
    pytest.param(
        "http://127.000.000.001/", {"host_kind": "reg-name"}, id="leading-zero-octets-reg-name"
    ),
    pytest.param(
        "http://127.0.0.1:8080/cb",
        {"host": "127.0.0.1", "host_kind": "ipv4", "port": "8080"},
        id="ipv4-with-port",
    ),
    pytest.param(
        "http://[::1]:61023/cb", {"host": "[::1]", "host_kind": "ipv6", "port": "61023"}, id="ipv6"
    ),
    pytest.param(
        "http://[0:0:0:0:0:0:0:1]/",
        {"host": "[0:0:0:0:0:0:0:1]", "host_kind": "ipv6"},
        id="ipv6-long",
    ),
    pytest.param("http://[::ffff:127.0.0.1]/", {"host_kind": "ipv6"}, id="ipv6-mapped-ipv4"),
    pytest.param("http://[2001:db8::]/", {"host_kind": "ipv6"}, id="ipv6-trailing-compression"),
    pytest.param("http://[v1.fe80::a+en1]/", {"host_kind": "ipvfuture"}, id="ipvfuture"),
    pytest.param("https://example.com:/", {"port": ""}, id="empty-port"),
    pytest.param("https://example.com:0443/", {"port": "0443"}, id="port-leading-zero-kept-raw"),
    pytest.param("https://u:p@example.com/", {"userinfo": "u:p"}, id="userinfo"),
    pytest.param(
        "https://@example.com/", {"userinfo": "", "host": "example.com"}, id="empty-userinfo"
    ),
    pytest.param(
        "com.example.app:/cb",
        {"scheme": "com.example.app", "has_authority": False, "path": "/cb"},
        id="private-use-one-slash",
    ),
    pytest.param(
        "com.example.app://cb",
        {"has_authority": True, "host": "cb", "path": ""},
        id="private-use-two",
    ),
    pytest.param(
        "urn:ietf:wg:oauth:2.0:oob",
        {"scheme": "urn", "path": "ietf:wg:oauth:2.0:oob"},
        id="oob-urn",
    ),
    pytest.param("/cb", {"scheme": None, "path": "/cb"}, id="relative-path"),
    pytest.param("//example.com/cb", {"scheme": None, "host": "example.com"}, id="network-path"),
    pytest.param("", {"scheme": None, "path": "", "has_authority": False}, id="empty-reference"),
    pytest.param("https://h/p?", {"query": "", "fragment": None}, id="empty-query"),
    pytest.param("https://h/p#", {"fragment": ""}, id="empty-fragment"),
    pytest.param("https://xn--bcher-kva.example/", {"host_kind": "reg-name"}, id="punycode"),
    pytest.param("https://h/%7e%2F", {"path": "/%7e%2F"}, id="percent-encoding-kept-raw"),
    pytest.param("https://h/a;b=c,d/@:!$&'()*+", {"path": "/a;b=c,d/@:!$&'()*+"}, id="sub-delims"),
    pytest.param("file:///etc/passwd", {"host": "", "path": "/etc/passwd"}, id="file-empty-host"),
    pytest.param(
        "HTTPS://EXAMPLE.COM/", {"scheme": "HTTPS", "host": "EXAMPLE.COM"}, id="case-kept"
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_parse_valid(text: str, expected: dict[str, object]) -> None:
    parsed = parse_uri(text)
    assert parsed.raw == text
    for field, value in expected.items():
        assert getattr(parsed, field) == value, field


def test_parsed_uri_is_a_frozen_value() -> None:
    parsed = parse_uri("https://example.com/cb")
    assert parsed == ParsedURI(
        raw="https://example.com/cb",
        scheme="https",
        userinfo=None,
        host="example.com",
        host_kind="reg-name",
        port=None,
        path="/cb",
        query=None,
        fragment=None,
        has_authority=True,
    )
    with pytest.raises(AttributeError):
        parsed.host = "evil.example"  # type: ignore[misc]


# --- parsing: rejected ------------------------------------------------------------------------

INVALID: list[Any] = [
    pytest.param(" https://h/", "space at position 0", 0, id="leading-space"),
    pytest.param("https://h/ ", "space at position 10", 10, id="trailing-space"),
    pytest.param("https://h/a b", "space at position 11", 11, id="inner-space"),
    pytest.param("\thttps://h/", "control character (tab) at position 0", 0, id="leading-tab"),
    pytest.param("https://h/\n", "control character (line feed)", 10, id="newline"),
    pytest.param("https://h/\r", "control character (carriage return)", 10, id="cr"),
    pytest.param("https://h/\x00", "control character (NUL)", 10, id="nul"),
    pytest.param("https://h/\x7f", "control character (U+007F)", 10, id="del"),
    pytest.param(
        "https://ｅxample.com/", "non-ASCII character U+FF45 at position 8", 8, id="fullwidth"
    ),
    pytest.param("https://example.com/ｃｂ", "non-ASCII character U+FF43", 20, id="fullwidth-path"),
    pytest.param("https://bücher.example/", "non-ASCII character U+00FC", 9, id="idn-unencoded"),
    pytest.param("https://h/\u00a0", "non-ASCII character U+00A0", 10, id="nbsp"),
    pytest.param("https://h/\ud800", "non-ASCII character U+D800", 10, id="lone-surrogate"),
    pytest.param("https:\\\\example.com\\cb", "character '\\' is not allowed", 6, id="backslash"),
    pytest.param("https://h/<script>", "character '<' is not allowed", 10, id="angle-bracket"),
    pytest.param('https://h/"', "character '\"' is not allowed", 10, id="double-quote"),
    pytest.param("https://h/{x}", "character '{' is not allowed", 10, id="brace"),
    pytest.param("https://h/%zz", "invalid percent-encoding at position 10", 10, id="pct-zz"),
    pytest.param("https://h/%4", "invalid percent-encoding", 10, id="pct-truncated"),
    pytest.param("https://h/100%", "invalid percent-encoding", 13, id="pct-bare"),
    pytest.param("1https://h/", "invalid scheme", 0, id="scheme-digit-first"),
    pytest.param("ht_tp://h/", "invalid scheme", 0, id="scheme-underscore"),
    pytest.param(":foo", "invalid scheme", 0, id="scheme-empty"),
    pytest.param("https://[::1/", "no closing ']'", 8, id="ipv6-unclosed"),
    pytest.param("https://[::1]x/", "unexpected 'x'", 13, id="ipv6-trailing-garbage"),
    pytest.param("https://[127.0.0.1]/", "invalid IPv6 literal", 8, id="ipv4-in-brackets"),
    pytest.param("https://[fe80::1%25eth0]/", "invalid IPv6 literal", 8, id="ipv6-zone-id"),
    pytest.param("https://[1:2:3:4:5:6:7:8:9]/", "invalid IPv6 literal", 8, id="ipv6-nine-groups"),
    pytest.param("https://[::1::]/", "invalid IPv6 literal", 8, id="ipv6-two-compressions"),
    pytest.param("https://[12345::1]/", "invalid IPv6 literal", 8, id="ipv6-five-digit-group"),
    pytest.param("https://[::01.2.3.4]/", "invalid IPv6 literal", 8, id="ipv6-v4-leading-zero"),
    pytest.param("https://[]/", "invalid IPv6 literal", 8, id="ipv6-empty"),
    pytest.param("https://[v1.]/", "invalid IPvFuture literal", 8, id="ipvfuture-empty"),
    pytest.param("https://h:80a/", "port is not numeric at position 10", 10, id="port-alpha"),
    pytest.param("https://h:8:8/", "port is not numeric", 10, id="port-two-colons"),
    pytest.param("https://h:*/", "port is not numeric", 10, id="port-star"),
    pytest.param("https://h:65536/", "port 65536 is out of range", 10, id="port-65536"),
    pytest.param("https://h:" + "9" * 5000 + "/", "is out of range", 10, id="port-5000-digits"),
    pytest.param("https://a@b@c/", "more than one '@'", 11, id="two-at-signs"),
    pytest.param("https://u[@h/", "'[' is not allowed in userinfo", 9, id="bracket-userinfo"),
    pytest.param("https://h]/", "']' is only allowed around an IP literal", 9, id="bracket-host"),
    pytest.param("https://h/[x]", "'[' is not allowed in the path", 10, id="bracket-path"),
    pytest.param("https://h/?a[]=1", "'[' is not allowed in the query", 12, id="bracket-query"),
    pytest.param("https://h/#a#b", "'#' is not allowed in the fragment", 12, id="double-hash"),
    pytest.param("https://h/#[", "'[' is not allowed in the fragment", 11, id="bracket-fragment"),
]


@pytest.mark.parametrize(("text", "reason", "position"), INVALID)
def test_parse_invalid(text: str, reason: str, position: int) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(text)
    assert reason in str(info.value)
    assert info.value.position == position
    assert isinstance(info.value, ValueError)


def test_parse_ports_at_the_boundary() -> None:
    assert parse_uri("https://h:65535/").port == "65535"
    assert parse_uri("https://h:0/").port == "0"
    assert parse_uri("https://h:000065535/").port == "000065535"


# --- normalization ----------------------------------------------------------------------------

NORMALIZE: list[Any] = [
    pytest.param("HTTPS://Example.COM/Path", "https://example.com/Path", id="case-scheme-host"),
    pytest.param("https://example.com:443/cb", "https://example.com/cb", id="default-port-https"),
    pytest.param("http://example.com:80/cb", "http://example.com/cb", id="default-port-http"),
    pytest.param("https://example.com:80/cb", "https://example.com:80/cb", id="other-port-kept"),
    pytest.param("http://example.com:443/", "http://example.com:443/", id="443-on-http-kept"),
    pytest.param("https://example.com:/cb", "https://example.com/cb", id="empty-port"),
    pytest.param("https://example.com:0443/", "https://example.com/", id="port-leading-zeros"),
    pytest.param("http://127.0.0.1:08080/", "http://127.0.0.1:8080/", id="port-leading-zero"),
    pytest.param("https://example.com", "https://example.com/", id="empty-path-https"),
    pytest.param("HTTP://[::1]", "http://[::1]/", id="empty-path-ipv6"),
    pytest.param("com.example.app://cb", "com.example.app://cb", id="empty-path-other-scheme"),
    pytest.param("https://example.com/a%2fb", "https://example.com/a%2Fb", id="hex-uppercased"),
    pytest.param(
        "https://example.com/%7Euser/%41%62", "https://example.com/~user/Ab", id="unreserved"
    ),
    pytest.param(
        "https://example.com/%2D%2E%5F%7E", "https://example.com/-._~", id="unreserved-marks"
    ),
    pytest.param("https://example.com/%2A%3a", "https://example.com/%2A%3A", id="reserved-kept"),
    pytest.param("https://ex%41mple.com/", "https://example.com/", id="host-decoded-lowercased"),
    pytest.param("https://%2a.example.com/", "https://%2A.example.com/", id="host-star-kept"),
    pytest.param("https://example.com/a/b/", "https://example.com/a/b/", id="trailing-slash-kept"),
    pytest.param("https://example.com/CB", "https://example.com/CB", id="path-case-kept"),
    pytest.param("https://example.com/cb?", "https://example.com/cb?", id="empty-query-kept"),
    pytest.param(
        "https://example.com/cb?b=2&a=1", "https://example.com/cb?b=2&a=1", id="query-order"
    ),
    pytest.param(
        "https://example.com/cb?x=%7e&y=%2f", "https://example.com/cb?x=~&y=%2F", id="query"
    ),
    pytest.param("https://example.com/cb?a/./b", "https://example.com/cb?a/./b", id="query-dots"),
    pytest.param("https://example.com/cb#", "https://example.com/cb#", id="empty-fragment-kept"),
    pytest.param("https://example.com/cb#%7e", "https://example.com/cb#~", id="fragment"),
    pytest.param("https://User%7e@Example.com/", "https://User~@example.com/", id="userinfo-case"),
    pytest.param("https://@example.com/", "https://@example.com/", id="empty-userinfo-kept"),
    pytest.param("http://[0:0:0:0:0:0:0:1]:8080/", "http://[::1]:8080/", id="ipv6-loopback-long"),
    pytest.param("http://[0000::0001]/", "http://[::1]/", id="ipv6-leading-zeros"),
    pytest.param("http://[2001:DB8:0:0:0:0:0:1]/", "http://[2001:db8::1]/", id="rfc5952-4.3-case"),
    pytest.param(
        "http://[2001:db8:0:1:1:1:1:1]/", "http://[2001:db8:0:1:1:1:1:1]/", id="rfc5952-4.2.2-one-0"
    ),
    pytest.param(
        "http://[2001:0:0:1:0:0:0:1]/", "http://[2001:0:0:1::1]/", id="rfc5952-4.2.3-long"
    ),
    pytest.param(
        "http://[2001:db8:0:0:1:0:0:1]/", "http://[2001:db8::1:0:0:1]/", id="rfc5952-4.2.3-first"
    ),
    pytest.param("http://[::FFFF:7F00:1]/", "http://[::ffff:127.0.0.1]/", id="rfc5952-5-mapped"),
    pytest.param("http://[V1.ABC]/", "http://[v1.abc]/", id="ipvfuture-lowercased"),
    pytest.param("http://127.1/", "http://127.1/", id="127.1-not-rewritten"),
    pytest.param("http://0x7F000001/", "http://0x7f000001/", id="hex-host-only-lowercased"),
    pytest.param("https:/x", "https:/x", id="https-no-authority-not-rewritten"),
    pytest.param("x:/.//y", "x:/.//y", id="rfc3986-5.3-no-authority-double-slash"),
    pytest.param("x:/a/..//y", "x:/.//y", id="dot-removal-exposes-double-slash"),
    pytest.param("urn:ietf:wg:oauth:2.0:oob", "urn:ietf:wg:oauth:2.0:oob", id="urn-unchanged"),
    pytest.param("./a:b", "./a:b", id="relative-dot-segments-kept"),
    pytest.param("../A/%7e/./b", "../A/~/./b", id="relative-only-percent-normalized"),
    pytest.param("//EXAMPLE.com/a/../b", "//example.com/a/../b", id="network-path-reference"),
    pytest.param("x:a/../b", "x:/b", id="rootless-path-rfc3986-5.2.2"),
    # RFC 3986 §6.2.2: these two are equivalent.
    pytest.param("example://a/b/c/%7Bfoo%7D", "example://a/b/c/%7Bfoo%7D", id="rfc3986-6.2.2-a"),
    pytest.param(
        "eXAMPLE://a/./b/../b/%63/%7bfoo%7d", "example://a/b/c/%7Bfoo%7D", id="rfc3986-6.2.2-b"
    ),
    # RFC 3986 §6.2.3: all equivalent to http://example.com/.
    pytest.param("http://example.com", "http://example.com/", id="rfc3986-6.2.3-a"),
    pytest.param("http://example.com:/", "http://example.com/", id="rfc3986-6.2.3-b"),
    pytest.param("http://example.com:80/", "http://example.com/", id="rfc3986-6.2.3-c"),
]


@pytest.mark.parametrize(("text", "expected"), NORMALIZE)
def test_normalize(text: str, expected: str) -> None:
    assert normalize_uri(parse_uri(text)) == expected
    assert normalize_uri(parse_uri(expected)) == expected


# RFC 3986 §5.4.1/§5.4.2 with base "http://a/b/c/d;p?q": a relative-path reference R merges to
# "http://a/b/c/" + R (§5.2.3), and remove_dot_segments must give the RFC's target URI.
RFC3986_5_4: list[Any] = [
    pytest.param(ref, target, id=f"5.4-{ref or 'empty'}")
    for ref, target in [
        ("g", "http://a/b/c/g"),
        ("./g", "http://a/b/c/g"),
        ("g/", "http://a/b/c/g/"),
        (";x", "http://a/b/c/;x"),
        ("g;x", "http://a/b/c/g;x"),
        (".", "http://a/b/c/"),
        ("./", "http://a/b/c/"),
        ("..", "http://a/b/"),
        ("../", "http://a/b/"),
        ("../g", "http://a/b/g"),
        ("../..", "http://a/"),
        ("../../", "http://a/"),
        ("../../g", "http://a/g"),
        ("../../../g", "http://a/g"),
        ("../../../../g", "http://a/g"),
        ("g.", "http://a/b/c/g."),
        (".g", "http://a/b/c/.g"),
        ("g..", "http://a/b/c/g.."),
        ("..g", "http://a/b/c/..g"),
        ("./../g", "http://a/b/g"),
        ("./g/.", "http://a/b/c/g/"),
        ("g/./h", "http://a/b/c/g/h"),
        ("g/../h", "http://a/b/c/h"),
        ("g;x=1/./y", "http://a/b/c/g;x=1/y"),
        ("g;x=1/../y", "http://a/b/c/y"),
        ("g?y/./x", "http://a/b/c/g?y/./x"),
        ("g?y/../x", "http://a/b/c/g?y/../x"),
        ("g#s/./x", "http://a/b/c/g#s/./x"),
        ("g#s/../x", "http://a/b/c/g#s/../x"),
    ]
]


@pytest.mark.parametrize(("ref", "target"), RFC3986_5_4)
def test_rfc3986_5_4_dot_segments(ref: str, target: str) -> None:
    assert normalize_uri(parse_uri("http://a/b/c/" + ref)) == target


@pytest.mark.parametrize(
    ("absolute_path", "target"),
    [
        pytest.param("/./g", "http://a/g", id="5.4.2-slash-dot-g"),
        pytest.param("/../g", "http://a/g", id="5.4.2-slash-dotdot-g"),
    ],
)
def test_rfc3986_5_4_absolute_path_references(absolute_path: str, target: str) -> None:
    assert normalize_uri(parse_uri("http://a" + absolute_path)) == target


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/a/b/c/./../../g", "/a/g", id="rfc3986-5.2.4-example-1"),
        pytest.param("mid/content=5/../6", "mid/6", id="rfc3986-5.2.4-example-2"),
        pytest.param("", "", id="empty"),
        pytest.param("/", "/", id="root"),
        pytest.param("/..", "/", id="above-root"),
        pytest.param("..", "", id="bare-dotdot"),
        pytest.param("/a/b/..", "/a/", id="trailing-dotdot"),
        pytest.param("/a/.b/..c/", "/a/.b/..c/", id="dotted-names-kept"),
    ],
)
def test_remove_dot_segments(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


# --- properties -------------------------------------------------------------------------------

_UNRESERVED = "abcXYZ019-._~"
_SUB_DELIMS = "!$&'()*+,;="


@st.composite
def uri_like(draw: st.DrawFn) -> str:
    """Mostly valid URIs, built from RFC 3986 components with awkward but legal choices."""
    pct = st.sampled_from(["%41", "%7e", "%7E", "%2f", "%2E", "%2e", "%25", "%2A", "%c3%bc"])
    chars = st.one_of(st.sampled_from(list(_UNRESERVED + _SUB_DELIMS + ":@")), pct)
    segment = st.one_of(
        st.sampled_from([".", "..", "", "a", "A"]), st.lists(chars, max_size=4).map("".join)
    )
    scheme = draw(
        st.sampled_from(
            ["http", "https", "HTTPS", "hTTp", "com.example.app", "urn", "x+y-z.1", "a"]
        )
    )
    out = scheme + ":"
    if draw(st.booleans()):
        out += "//"
        if draw(st.integers(0, 4)) == 0:
            out += draw(st.lists(chars, max_size=3).map("".join)).replace("@", "") + "@"
        host_kind = draw(st.integers(0, 3))
        if host_kind == 0:
            host = draw(
                st.lists(
                    st.one_of(st.sampled_from(list("aZ09-._~!$&'()*+,;=")), pct), max_size=6
                ).map("".join)
            )
        elif host_kind == 1:
            host = str(draw(st.ip_addresses(v=4)))
        elif host_kind == 2:
            address = draw(st.ip_addresses(v=6))
            assert isinstance(address, ipaddress.IPv6Address)
            text = draw(st.sampled_from([address.compressed, address.exploded]))
            host = "[" + draw(st.sampled_from([text, text.upper()])) + "]"
        else:
            host = draw(st.sampled_from(["localhost", "LOCALHOST.", "127.0.0.1", "127.1", "[::1]"]))
        out += host
        if draw(st.booleans()):
            out += ":" + draw(st.sampled_from(["", "0", "80", "443", "0443", "8080", "65535"]))
        if draw(st.booleans()):
            out += "/"
    elif draw(st.booleans()):
        out += "/"
    out += "/".join(draw(st.lists(segment, max_size=5)))
    if draw(st.booleans()):
        out += "?" + "".join(
            draw(st.lists(st.one_of(chars, st.just("/"), st.just("?")), max_size=5))
        )
    if draw(st.integers(0, 5)) == 0:
        out += "#" + "".join(draw(st.lists(chars, max_size=3)))
    return out


_ANY_URI_TEXT = st.one_of(
    uri_like(),
    st.text(),
    st.lists(st.sampled_from([*"ab:/?#[]@%2Af.1v\\ ", "%41", "::", "//", "é"])).map("".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uri_like())
def test_normalization_is_idempotent(text: str) -> None:
    try:
        parsed = parse_uri(text)
    except URIError:
        return
    once = normalize_uri(parsed)
    again = parse_uri(once)
    assert normalize_uri(again) == once
    # Normalization never changes what kind of URI it is.
    assert again.scheme == (parsed.scheme.lower() if parsed.scheme else None)
    assert again.has_authority == parsed.has_authority
    assert (again.userinfo is None) == (parsed.userinfo is None)
    assert (again.fragment is None) == (parsed.fragment is None)
    assert (again.query is None) == (parsed.query is None)


@settings(max_examples=400, deadline=None)
@given(_ANY_URI_TEXT)
def test_fast_path_agrees_with_the_full_grammar_check(text: str) -> None:
    try:
        expected: ParsedURI | str = _parse_strict(text)
    except URIError as exc:
        expected = str(exc)
    try:
        actual: ParsedURI | str = parse_uri(text)
    except URIError as exc:
        actual = str(exc)
    assert actual == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_raises_only_uri_error(text: str) -> None:
    try:
        parsed = parse_uri(text)
    except URIError as exc:
        assert exc.reason
        return
    normalize_uri(parsed)


# --- what browsers and resolvers make of a host (oauthmig.redirects.hosts) ----------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.01", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("4294967295", "255.255.255.255"),
        ("0x", "0.0.0.0"),
        ("00", "0.0.0.0"),
        ("1.0x", "1.0.0.0"),
        ("8.8.2056", "8.8.8.8"),
        ("256.256.256.256", None),
        ("1.2.3.4.5", None),
        ("1.2.3.256", None),
        ("4294967296", None),
        ("0x100000000", None),
        ("1.16777216", None),
        ("09", None),
        ("1.2.3.08", None),
        ("app.example.123", None),
        ("0x" + "f" * 60, None),
    ],
)
def test_whatwg_ipv4_parser(host: str, expected: str | None) -> None:
    assert ends_in_a_number(host)
    address = browser_ipv4(host)
    assert (None if address is None else ipv4_text(address)) == expected


@pytest.mark.parametrize(
    "host", ["example.com", "localhost", "localhost.", "0x7g", "1.2.3.example", "a.b-1", "", "."]
)
def test_names_that_do_not_end_in_a_number(host: str) -> None:
    assert not ends_in_a_number(host)


_RADIX_FORMS = [(10, "{:d}"), (8, "0{:o}"), (16, "0x{:x}")]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
    st.lists(st.sampled_from(_RADIX_FORMS), min_size=4, max_size=4),
)
def test_whatwg_ipv4_agrees_with_inet_aton(values: list[int], forms: list[tuple[int, str]]) -> None:
    # The C library's inet_aton() accepts the same 1-4 part decimal/octal/hex spellings
    # (RFC 3986 §7.4), so it is an independent oracle for the well-formed ones.
    parts = [fmt.format(v) for v, (_, fmt) in zip(values, forms, strict=False)]
    host = ".".join(parts)
    try:
        expected: int | None = int.from_bytes(socket.inet_aton(host), "big")
    except OSError:
        expected = None
    assert browser_ipv4(host) == expected


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("app..example.com", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("-app.example.com", "hyphen"),
        ("app-.example.com", "hyphen"),
        ("a" * 64 + ".example", "64 characters"),
        (".".join(["a" * 63] * 4), "255 characters"),
        ("xn--zz.example", "not a valid A-label"),
        ("xn--.example", "hyphen"),
        ("xn--lzg.example", "not a valid A-label"),
    ],
)
def test_dns_host_problems(host: str, problem: str) -> None:
    found = dns_host_problem(host)
    assert found is not None and problem in found, found


@pytest.mark.parametrize(
    "host",
    [
        "app.example.com",
        "app.example.com.",
        "xn--bcher-kva.example",
        "my_app.example",
        "ab--cd.example",
        "a" * 63 + ".example",
        ".".join(["a" * 63] * 3 + ["b" * 61]),
        "intranet",
    ],
)
def test_dns_hosts_accepted(host: str) -> None:
    assert dns_host_problem(host) is None


def test_a_label_form_follows_uts46_then_idna2008() -> None:
    assert a_label_form("bücher.example") == ("xn--bcher-kva.example", None)
    assert a_label_form("BÜCHER.example") == ("xn--bcher-kva.example", None)
    assert a_label_form("ｅxample。com") == ("example.com", None)
    browser, error = a_label_form("€.example")
    assert browser == "xn--lzg.example" and error is not None
    assert a_label_form("fa\u00df.example") == ("xn--fa-hia.example", None)  # non-transitional
