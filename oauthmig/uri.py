"""Strict RFC 3986 URI-reference parsing and normalization.

:func:`parse_uri` splits a string with the regular expression of RFC 3986 Appendix B and then
checks every component against the ABNF of Appendix A. It never repairs anything: unlike a
browser-style (WHATWG) parser it keeps ``127.1`` and ``0x7f000001`` as plain reg-names, rejects
``\\`` and whitespace, and reads ``https:/x`` as a scheme with no authority. Failures raise
:class:`URIError` whose message gives the reason and, where there is one, the 0-based position.

:func:`normalize_uri` applies the syntax-based and scheme-based normalizations of RFC 3986
§6.2.2-§6.2.3, plus the RFC 5952 text form of IPv6 literals. It is idempotent.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_PORTS",
    "HostKind",
    "ParsedURI",
    "URIError",
    "is_ipv4_address",
    "normalize_components",
    "normalize_host",
    "normalize_uri",
    "parse_uri",
    "remove_dot_segments",
]

HostKind = Literal["reg-name", "ipv4", "ipv6", "ipvfuture"]

#: Scheme-based normalization (RFC 3986 §6.2.3) drops these ports.
DEFAULT_PORTS: dict[str, str] = {"http": "80", "https": "443"}

_MAX_PORT = 65535


#: Length of Sentry's ``grant.redirect_uri varchar(255)``: what the legacy schema declares, what
#: the models refuse beyond, and RU016's limit where the live column length is unknown.
GRANT_REDIRECT_URI_LENGTH = 255


class URIError(ValueError):
    """The text is not an RFC 3986 URI-reference; ``str(error)`` is the reason.

    ``position`` is the 0-based index of the offending character when there is one.
    """

    def __init__(self, reason: str, position: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.position = position


@dataclass(frozen=True, slots=True)
class ParsedURI:
    """The components of a URI-reference, exactly as written (nothing decoded or case-folded).

    ``scheme`` is None for a relative reference. ``host`` is None without an authority, and an
    IP literal keeps its brackets (``"[::1]"``), as in the ``host`` rule of RFC 3986 §3.2.2.
    ``port`` is the raw digits after ``:`` (``""`` for a bare colon) or None without a colon.
    """

    raw: str
    scheme: str | None
    userinfo: str | None
    host: str | None
    host_kind: HostKind | None
    port: str | None
    path: str
    query: str | None
    fragment: str | None
    has_authority: bool


# RFC 3986 Appendix B; every string matches it, the components are validated afterwards.
_SPLIT_RE = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.S)

# Everything RFC 3986 allows anywhere: unreserved, gen-delims, sub-delims and "%".
_URI_CHARS = r"A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%"
_BAD_CHAR_RE = re.compile(f"[^{_URI_CHARS}]")
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PCT_RE = re.compile(r"%[0-9A-Fa-f]{2}")
_BRACKET_RE = re.compile(r"[\[\]]")
_FRAGMENT_BAD_RE = re.compile(r"[\[\]#]")

# The common case in one expression: an absolute URI with at most a reg-name or IPv4 host.
# Percent-encodings are checked separately; anything it rejects goes to _parse_strict.
_U = r"A-Za-z0-9\-._~!$&'()*+,;=%"  # unreserved, sub-delims and "%"
_FAST_RE = re.compile(
    rf"([A-Za-z][A-Za-z0-9+.\-]*):"
    rf"(?://(?:([{_U}:]*)@)?([{_U}]*)(?::([0-9]*))?(?=[/?#]|\Z)|(?!//))"
    rf"([{_U}:@/]*)(?:\?([{_U}:@/?]*))?(?:#([{_U}:@/?]*))?"
)
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
_PORT_RE = re.compile(r"[0-9]*")
_DEC_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9][0-9]|[0-9])"
_IPV4 = rf"{_DEC_OCTET}(?:\.{_DEC_OCTET}){{3}}"
_IPV4_RE = re.compile(_IPV4)
_IPVFUTURE_RE = re.compile(r"[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+")


def _ipv6_pattern() -> str:
    """The IPv6address rule of RFC 3986 §3.2.2, alternative by alternative."""
    h16 = "[0-9A-Fa-f]{1,4}"
    ls32 = f"(?:{h16}:{h16}|{_IPV4})"

    def left(max_repeat: int) -> str:
        # [ *n( h16 ":" ) h16 ]
        if max_repeat < 0:
            return ""
        return f"(?:(?:{h16}:){{0,{max_repeat}}}{h16})?"

    alternatives = [
        f"(?:{h16}:){{6}}{ls32}",
        f"::(?:{h16}:){{5}}{ls32}",
        f"{left(0)}::(?:{h16}:){{4}}{ls32}",
        f"{left(1)}::(?:{h16}:){{3}}{ls32}",
        f"{left(2)}::(?:{h16}:){{2}}{ls32}",
        f"{left(3)}::{h16}:{ls32}",
        f"{left(4)}::{ls32}",
        f"{left(5)}::{h16}",
        f"{left(6)}::",
    ]
    return "|".join(f"(?:{alt})" for alt in alternatives)


_IPV6_RE = re.compile(_ipv6_pattern())

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DOT_SEGMENT_RE = re.compile(r"(?:^|/)\.\.?(?:/|$)")

_CONTROL_NAMES = {0x09: "tab", 0x0A: "line feed", 0x0D: "carriage return", 0x00: "NUL"}


def _bad_char_reason(ch: str, pos: int) -> str:
    code = ord(ch)
    if code < 0x20 or code == 0x7F:
        name = _CONTROL_NAMES.get(code, f"U+{code:04X}")
        return f"control character ({name}) at position {pos}"
    if code == 0x20:
        return f"space at position {pos}"
    if code > 0x7F:
        return f"non-ASCII character U+{code:04X} at position {pos}"
    return f"character '{ch}' is not allowed by RFC 3986 at position {pos}"


def _port_out_of_range(port: str) -> bool:
    digits = port.lstrip("0")
    # Compare lengths first: int() refuses strings beyond sys.get_int_max_str_digits().
    return len(digits) > 5 or (bool(digits) and int(digits) > _MAX_PORT)


# Frozen dataclasses set each field through object.__setattr__ (about 1.5 us for ParsedURI);
# writing the slots directly is three times faster and parse_uri sits on the hot path of
# check_uri. The result is identical to ParsedURI(...).
_NEW = object.__new__
(
    _SET_RAW,
    _SET_SCHEME,
    _SET_USERINFO,
    _SET_HOST,
    _SET_HOST_KIND,
    _SET_PORT,
    _SET_PATH,
    _SET_QUERY,
    _SET_FRAGMENT,
    _SET_HAS_AUTHORITY,
) = (vars(ParsedURI)[name].__set__ for name in ParsedURI.__dataclass_fields__)


def parse_uri(text: str) -> ParsedURI:
    """Parse ``text`` as an RFC 3986 URI-reference (absolute URI or relative reference).

    Raises :class:`URIError` naming the first violation. Ports above 65535 are rejected too:
    the RFC leaves the range to the scheme, and for every scheme here it is a TCP port.
    """
    if "%" not in text or _BAD_PCT_RE.search(text) is None:
        m = _FAST_RE.fullmatch(text)
        if m is not None:
            scheme, userinfo, host, port, path, query, fragment = m.groups()
            if not port or not _port_out_of_range(port):
                parsed: ParsedURI = _NEW(ParsedURI)
                _SET_RAW(parsed, text)
                _SET_SCHEME(parsed, scheme)
                _SET_USERINFO(parsed, userinfo)
                _SET_HOST(parsed, host)
                _SET_HOST_KIND(
                    parsed,
                    None if host is None else "ipv4" if _IPV4_RE.fullmatch(host) else "reg-name",
                )
                _SET_PORT(parsed, port)
                _SET_PATH(parsed, path)
                _SET_QUERY(parsed, query)
                _SET_FRAGMENT(parsed, fragment)
                _SET_HAS_AUTHORITY(parsed, host is not None)
                return parsed
    return _parse_strict(text)


def _parse_strict(text: str) -> ParsedURI:
    """The complete Appendix A check with a precise reason; :func:`parse_uri` only comes
    here when its fast expression does not match (any error, relative references, IP literals).

    Stays whole: it walks RFC 3986's grammar in order (scheme, authority, path, query,
    fragment), and the order of the checks decides which reason a bad URI gets.
    """
    bad = _BAD_CHAR_RE.search(text)
    if bad is not None:
        pos = bad.start()
        raise URIError(_bad_char_reason(text[pos], pos), pos)
    if "%" in text:
        bad = _BAD_PCT_RE.search(text)
        if bad is not None:
            pos = bad.start()
            raise URIError(f"invalid percent-encoding at position {pos}", pos)

    m = _SPLIT_RE.fullmatch(text)
    if m is None:  # pragma: no cover - the Appendix B expression matches every string
        raise URIError("unparseable URI")
    scheme, authority, path, query, fragment = m.groups()

    if scheme is not None:
        if _SCHEME_RE.fullmatch(scheme) is None:
            raise URIError(f"invalid scheme '{scheme}' (RFC 3986 §3.1)", 0)
    elif authority is None and path.startswith(":"):
        # A colon before any "/" would have been read as the end of a scheme (§4.2 path-noscheme).
        raise URIError("invalid scheme: empty scheme before ':' at position 0", 0)

    userinfo: str | None = None
    host: str | None = None
    host_kind: HostKind | None = None
    port: str | None = None
    brackets = "[" in text or "]" in text

    if authority is not None:
        offset = m.start(2)
        at = authority.find("@")
        hostport = authority
        if at >= 0:
            userinfo = authority[:at]
            hostport = authority[at + 1 :]
            if brackets and (b := _BRACKET_RE.search(userinfo)) is not None:
                pos = offset + b.start()
                raise URIError(
                    f"'{userinfo[b.start()]}' is not allowed in userinfo at position {pos}", pos
                )
            offset += at + 1
            second = hostport.find("@")
            if second >= 0:
                pos = offset + second
                raise URIError(f"more than one '@' in the authority at position {pos}", pos)
        if hostport.startswith("["):
            close = hostport.find("]")
            if close < 0:
                raise URIError(f"invalid IP literal: no closing ']' at position {offset}", offset)
            literal = hostport[1:close]
            rest = hostport[close + 1 :]
            if rest and rest[0] != ":":
                pos = offset + close + 1
                raise URIError(f"invalid IP literal: unexpected '{rest[0]}' at position {pos}", pos)
            if literal[:1] in ("v", "V"):
                if _IPVFUTURE_RE.fullmatch(literal) is None:
                    raise URIError(f"invalid IPvFuture literal at position {offset}", offset)
                host_kind = "ipvfuture"
            elif _IPV6_RE.fullmatch(literal) is not None:
                host_kind = "ipv6"
            else:
                raise URIError(f"invalid IPv6 literal at position {offset}", offset)
            host = hostport[: close + 1]
            port_offset = offset + close + 2
            if rest:
                port = rest[1:]
        else:
            colon = hostport.find(":")
            if colon >= 0:
                host = hostport[:colon]
                port = hostport[colon + 1 :]
            else:
                host = hostport
            port_offset = offset + colon + 1
            if brackets and (b := _BRACKET_RE.search(host)) is not None:
                pos = offset + b.start()
                raise URIError(
                    f"'{host[b.start()]}' is only allowed around an IP literal, at position {pos}",
                    pos,
                )
            host_kind = "ipv4" if _IPV4_RE.fullmatch(host) is not None else "reg-name"
        if port:
            if _PORT_RE.fullmatch(port) is None:
                raise URIError(f"port is not numeric at position {port_offset}", port_offset)
            if _port_out_of_range(port):
                shown = port if len(port) <= 12 else f"{port[:9]}..."
                raise URIError(f"port {shown} is out of range 0-65535", port_offset)

    if brackets:
        for group, value, pattern in (
            (3, path, _BRACKET_RE),
            (4, query, _BRACKET_RE),
            (5, fragment, _FRAGMENT_BAD_RE),
        ):
            if value and (b := pattern.search(value)) is not None:
                pos = m.start(group) + b.start()
                part = ("path", "query", "fragment")[group - 3]
                raise URIError(
                    f"'{value[b.start()]}' is not allowed in the {part} at position {pos}", pos
                )
    elif fragment and "#" in fragment:
        pos = m.start(5) + fragment.index("#")
        raise URIError(f"'#' is not allowed in the fragment at position {pos}", pos)

    return ParsedURI(
        raw=text,
        scheme=scheme,
        userinfo=userinfo,
        host=host,
        host_kind=host_kind,
        port=port,
        path=path,
        query=query,
        fragment=fragment,
        has_authority=authority is not None,
    )


def is_ipv4_address(text: str) -> bool:
    """Whether ``text`` is an RFC 3986 ``IPv4address`` (four dec-octets, no leading zeros)."""
    return _IPV4_RE.fullmatch(text) is not None


def _pct_keep_case(match: re.Match[str]) -> str:
    triplet = match.group()
    char = chr(int(triplet[1:], 16))
    return char if char in _UNRESERVED else triplet.upper()


def _pct_lower(match: re.Match[str]) -> str:
    triplet = match.group()
    char = chr(int(triplet[1:], 16))
    return char.lower() if char in _UNRESERVED else triplet.upper()


def _normalize_pct(value: str) -> str:
    """Decode percent-encoded unreserved characters, uppercase the other triplets (§6.2.2.1-2)."""
    if "%" not in value:
        return value
    return _PCT_RE.sub(_pct_keep_case, value)


def normalize_host(host: str, host_kind: HostKind | None) -> str:
    """The normalized text of a ``host`` component (RFC 3986 §6.2.2.1, RFC 5952 for IPv6)."""
    if host_kind == "ipv6":
        if host == "[::1]":
            return host  # already canonical, and the common native-app case
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:  # pragma: no cover - parse_uri validated the literal already
            return host.lower()
        mapped = address.ipv4_mapped
        # RFC 5952 §5: IPv4-mapped addresses keep the dotted quad.
        text = f"::ffff:{mapped}" if mapped is not None else address.compressed
        return f"[{text}]"
    lowered = host.lower()
    if "%" not in lowered:
        return lowered
    return _PCT_RE.sub(_pct_lower, lowered)


def remove_dot_segments(path: str) -> str:
    """The ``remove_dot_segments`` algorithm of RFC 3986 §5.2.4."""
    if _DOT_SEGMENT_RE.search(path) is None:
        return path
    output: list[str] = []
    buf = path
    while buf:
        if buf.startswith("../"):
            buf = buf[3:]
        elif buf.startswith(("./", "/./")):
            buf = buf[2:]
        elif buf == "/.":
            buf = "/"
        elif buf.startswith("/../"):
            buf = buf[3:]
            if output:
                output.pop()
        elif buf == "/..":
            buf = "/"
            if output:
                output.pop()
        elif buf in (".", ".."):
            buf = ""
        else:
            end = buf.find("/", 1)
            if end < 0:
                output.append(buf)
                buf = ""
            else:
                output.append(buf[:end])
                buf = buf[end:]
    return "".join(output)


def _normalize_path(path: str, scheme: str | None, has_authority: bool) -> str:
    if "%" in path:
        path = _PCT_RE.sub(_pct_keep_case, path)
    if scheme is None:
        return path  # dot segments of a relative reference only resolve against a base (§5.2)
    if "." in path:
        path = remove_dot_segments(path)
    if has_authority:
        if not path and scheme in DEFAULT_PORTS:
            return "/"  # RFC 3986 §6.2.3: an empty http(s) path is equivalent to "/"
        return path
    if path.startswith("//"):
        # Without an authority the path must not start with "//" (§3.3); §5.3 prefixes "/.".
        return "/." + path
    return path


def normalize_uri(parsed: ParsedURI) -> str:
    """The RFC 3986 §6.2.2-§6.2.3 normal form of ``parsed``, used to store and compare URIs.

    Lowercases scheme and host, drops an empty or default port (and leading zeros of a port),
    turns an empty http(s) path into ``/``, uppercases percent-encoding hex, decodes only
    percent-encoded unreserved characters and removes dot segments (not from a relative
    reference, whose dot segments only resolve against a base). Path case, trailing
    slashes, query order, an empty ``?`` and any fragment are kept; IPv6 literals take their
    RFC 5952 form. ``normalize_uri(parse_uri(normalize_uri(p))) == normalize_uri(p)``.
    """
    return normalize_components(parsed)[2]


def normalize_components(parsed: ParsedURI) -> tuple[str | None, str, str]:
    """``(host, path, uri)`` of the normal form: the normalized host (None without an
    authority), the normalized path and the whole normalized URI (see :func:`normalize_uri`).
    """
    scheme = parsed.scheme
    head = ""
    if scheme is not None:
        scheme = scheme.lower()
        head = scheme + ":"
    host: str | None = None
    if parsed.has_authority:
        host = normalize_host(parsed.host or "", parsed.host_kind)
        userinfo = parsed.userinfo
        if userinfo is None:
            head = f"{head}//{host}"
        else:
            head = f"{head}//{_normalize_pct(userinfo)}@{host}"
        port = parsed.port
        if port:
            port = port.lstrip("0") or "0"
            if scheme is None or DEFAULT_PORTS.get(scheme) != port:
                head = f"{head}:{port}"
    path = _normalize_path(parsed.path, scheme, parsed.has_authority)
    uri = head + path
    query = parsed.query
    if query is not None:
        uri = f"{uri}?{_normalize_pct(query)}"
    fragment = parsed.fragment
    if fragment is not None:
        uri = f"{uri}#{_normalize_pct(fragment)}"
    return host, path, uri
