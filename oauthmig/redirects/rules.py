"""Redirect URI rules: a registry of stable codes and the pure checks behind them.

Every rule has a stable code (``RU001``...), a name, a severity and a docstring with the RFC
section, an anti-pattern and its fix; :data:`RULES` maps code to :class:`Rule`, and
``docs/rules.md`` has one section per code. Codes are never renumbered.

Per-URI rules (RU001-RU014, RU016-RU019) are small functions of a :class:`UriSubject`, the
parsed URI plus the application type; :func:`check_uri` runs them. RU001 (not a URI) stops
every other check but the three that read the raw text (RU004 wildcard, RU016 length,
RU019 secret parameter); RU002
(relative) stops the checks that need a scheme. Host rules ask :mod:`oauthmig.redirects.hosts`
what a browser (WHATWG URL) and DNS make of the host; parsing itself stays strictly RFC 3986.
Application rules (RU015, RU101-RU104) look at all the redirect URIs of one application;
:func:`check_application` runs both kinds. Nothing here touches a database or raises on any
string input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NamedTuple

from oauthmig.redact import is_secret_uri_param, mask_uri
from oauthmig.redirects.hosts import (
    browser_ipv4,
    dns_host_problem,
    encoded_host_problem,
    ends_in_a_number,
    ipv4_text,
    non_ascii_host_hint,
)
from oauthmig.redirects.metadata_rules import METADATA_RULES
from oauthmig.redirects.rule_types import Rule, Severity, make_rule
from oauthmig.uri import (
    GRANT_REDIRECT_URI_LENGTH,
    ParsedURI,
    URIError,
    is_ipv4_address,
    normalize_components,
    parse_uri,
)

__all__ = [
    "GRANT_REDIRECT_URI_LENGTH",
    "RULES",
    "AppFinding",
    "AppReport",
    "AppType",
    "Finding",
    "Rule",
    "Severity",
    "UriReport",
    "UriStyle",
    "UriSubject",
    "Verdict",
    "check_application",
    "check_uri",
    "classify_uri_style",
    "infer_app_type",
    "split_redirect_uris",
]


class AppType(StrEnum):
    """OpenID Connect Registration ``application_type``."""

    WEB = "web"
    NATIVE = "native"


Verdict = Literal["pass", "warn", "fail"]
UriStyle = Literal["web", "native", "unknown"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule firing on one URI."""

    code: str
    name: str
    severity: Severity
    message: str


@dataclass(frozen=True, slots=True)
class UriReport:
    """The outcome of :func:`check_uri`; ``normalized`` is None when the URI is not an
    absolute URI (RU001/RU002)."""

    uri: str
    app_type: AppType
    verdict: Verdict
    normalized: str | None
    findings: tuple[Finding, ...]


@dataclass(frozen=True, slots=True)
class AppFinding:
    """A finding in an application report, with the URI it is about (None for the whole app)
    and the 1-based line of ``redirect_uris`` it is on (None when it is on no line: the whole
    application, or a live grant's URI)."""

    uri: str | None
    normalized: str | None
    code: str
    name: str
    severity: Severity
    message: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class AppReport:
    """The outcome of :func:`check_application`: one report per registered URI (blank lines
    excluded) and the application-level findings. ``lines`` holds the line of
    ``redirect_uris`` of each report in ``uris`` (empty for a report built by hand)."""

    app_type: AppType
    verdict: Verdict
    uris: tuple[UriReport, ...]
    findings: tuple[AppFinding, ...]
    lines: tuple[int, ...] = ()

    def all_findings(self) -> tuple[AppFinding, ...]:
        """Every finding, per-URI ones first (in URI order), then the application-level ones."""
        lines: tuple[int | None, ...] = self.lines or (None,) * len(self.uris)
        out = [
            AppFinding(r.uri, r.normalized, f.code, f.name, f.severity, f.message, line)
            for r, line in zip(self.uris, lines, strict=True)
            for f in r.findings
        ]
        out.extend(self.findings)
        return tuple(out)


class UriSubject(NamedTuple):
    """What a per-URI rule sees.

    ``scheme`` is lowercased; ``host`` and ``path`` are the normalized components (RFC 3986
    §6.2.2), so that a URI and its normalized form get the same findings. ``error`` is the parse
    failure, if any; then ``parsed`` is None.
    """

    raw: str
    app_type: AppType
    parsed: ParsedURI | None
    error: str | None
    scheme: str | None
    host: str | None
    path: str
    normalized: str | None
    max_length: int | None


UriCheck = Callable[[UriSubject], str | None]
_Stage = Literal["gate", "parsed", "absolute", "always"]


class _Entry(NamedTuple):
    line: int
    uri: str
    subject: UriSubject
    style: UriStyle


class _AppSubject(NamedTuple):
    app_type: AppType
    has_secret: bool
    can_use_code_grant: bool
    entries: tuple[_Entry, ...]
    live_grant_uris: tuple[str, ...]


# (uri, normalized, message, line): the URI the finding is about (None: the application), and
# the line of redirect_uris it is on (None: no line, e.g. a live grant's URI).
_AppHit = tuple[str | None, str | None, str, int | None]
_AppCheck = Callable[[_AppSubject], list[_AppHit]]

RULES: dict[str, Rule] = {}
_URI_CHECKS: dict[_Stage, list[tuple[Rule, UriCheck, tuple[AppType, ...]]]] = {
    "gate": [],
    "parsed": [],
    "absolute": [],
    "always": [],
}
_APP_CHECKS: list[tuple[Rule, _AppCheck]] = []


def _make_rule(
    code: str, name: str, severity: Severity, summary: str, rfc: str, func: Callable[..., object]
) -> Rule:
    return make_rule(RULES, code, name, severity, summary, rfc, func)


def _uri_rule(
    code: str,
    name: str,
    severity: Severity,
    *,
    summary: str,
    rfc: str,
    stage: _Stage,
    app_types: tuple[AppType, ...] = (AppType.WEB, AppType.NATIVE),
) -> Callable[[UriCheck], UriCheck]:
    """Register a per-URI rule. ``stage`` says when it runs: ``gate`` (RU001, decides whether
    the text is a URI at all), ``parsed`` (any URI-reference), ``absolute`` (needs a scheme) or
    ``always`` (even on text that is not a URI). ``app_types`` lets :func:`check_uri` skip a
    rule that can only fire for the other type (the rule still checks the type itself)."""

    def register(func: UriCheck) -> UriCheck:
        rule = _make_rule(code, name, severity, summary, rfc, func)
        _URI_CHECKS[stage].append((rule, func, app_types))
        return func

    return register


def _app_rule(
    code: str, name: str, severity: Severity, *, summary: str, rfc: str
) -> Callable[[_AppCheck], _AppCheck]:
    """Register an application-level rule; it returns ``(uri, normalized, message)`` tuples,
    ``uri`` being the URI the finding is about or None for the whole application."""

    def register(func: _AppCheck) -> _AppCheck:
        _APP_CHECKS.append((_make_rule(code, name, severity, summary, rfc, func), func))
        return func

    return register


_HTTP_SCHEMES = frozenset({"http", "https"})
_FORBIDDEN_SCHEMES = frozenset({"javascript", "vbscript", "data", "blob", "file", "about"})
_OOB_PATHS = frozenset({"ietf:wg:oauth:2.0:oob", "ietf:wg:oauth:2.0:oob:auto"})
# RFC 8252 §7.3 names exactly these two loopback literals.
_LOOPBACK_LITERALS = frozenset({"127.0.0.1", "[::1]"})
_LOCALHOST_NAMES = frozenset({"localhost", "localhost."})


# RFC 3986 Appendix B: where the query (group 4) and fragment (group 5) of any string start.
_SPLIT_RE = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.S)


def _is_oob(s: UriSubject) -> bool:
    return s.scheme == "urn" and s.path.lower() in _OOB_PATHS


def _is_loopback_ip(host: str | None) -> bool:
    """Any loopback IP literal: 127.0.0.0/8 or [::1] (host already normalized)."""
    if host is None:
        return False
    if host == "[::1]":
        return True
    return host.startswith("127.") and is_ipv4_address(host)


def _is_private_use(s: UriSubject) -> bool:
    scheme = s.scheme
    return (
        scheme is not None
        and scheme not in _HTTP_SCHEMES
        and scheme not in _FORBIDDEN_SCHEMES
        and not _is_oob(s)
    )


# --- per-URI rules ---------------------------------------------------------------------------


@_uri_rule(
    "RU001",
    "not-a-uri",
    Severity.ERROR,
    summary="The value is not a URI: empty, whitespace, control or non-ASCII characters, "
    "characters outside RFC 3986, bad percent-encoding, scheme, IP literal or port, "
    "http(s) without a host, or a host that percent-decodes to a delimiter, a control "
    "character or an internationalized name.",
    rfc="RFC 3986 Appendix A, §3.2.2; RFC 9110 §4.2.1; UTS #46; RFC 5891",
    stage="gate",
)
def not_a_uri(s: UriSubject) -> str | None:
    """The value must follow the RFC 3986 Appendix A grammar to the letter.

    A lenient (browser-style) parser would repair ``http://127.1``, ``https:\\\\evil.example``
    or ``https:/app.example.com`` into something else, so the value the server matches is not
    the one the user reviewed. http and https URIs also need a host (RFC 9110 §4.2.1).

    A host is percent-decoded by every component that resolves it (browsers do it before
    anything else), so ``%40``, ``%2F``, ``%3A``, ``%23``, ``%5C``, ``%3F``, ``%25``, a
    percent-encoded space or control character, and every other encoding of a character that
    is not unreserved, put a different authority behind the reviewed text (``%2A`` is RU004).
    Internationalized hosts follow one policy, however they are spelled: RFC 3986 §3.2.2 says
    such a name "must be transformed to the IDNA encoding [RFC3490] prior to name lookup" and
    that "URI producers should provide these registered names in the IDNA encoding, rather than
    a percent-encoding". Both ``https://bücher.example/cb`` (not a URI) and
    ``https://b%C3%BCcher.example/cb`` are errors whose message gives the A-label a browser
    would use (UTS #46 mapping, IDNA2008 validity): ``https://xn--bcher-kva.example/cb``.

    Anti-pattern: ``https://app.example.com/cb `` (trailing space), ``https://ｅxample.com/``
    (fullwidth letters), ``https:/app.example.com/cb``, ``https://app.example.com:443x/``,
    ``https://app.example.com%40evil.example/cb``, ``https://%E2%82%AC.example/cb``.
    Fix: ``https://app.example.com/cb``, with non-ASCII hosts in their A-label (punycode) form
    (``https://xn--bcher-kva.example/``).
    """
    if not s.raw:
        return "empty value"
    if s.error is not None:
        if s.error.startswith("non-ASCII"):
            hint = non_ascii_host_hint(s.raw)
            if hint is not None:
                return f"{s.error}; {hint}"
        return s.error
    parsed = s.parsed
    if parsed is None:  # pragma: no cover - a subject without a parse has an error
        return None
    host = parsed.host
    if s.scheme in _HTTP_SCHEMES and not host:
        return f"{s.scheme} URI without a host"
    if host and parsed.host_kind == "reg-name" and "%" in host:
        return encoded_host_problem(host, s.raw, idn=s.scheme in _HTTP_SCHEMES)
    return None


@_uri_rule(
    "RU002",
    "relative",
    Severity.ERROR,
    summary="The URI has no scheme; a redirection endpoint must be an absolute URI.",
    rfc="RFC 6749 §3.1.2",
    stage="parsed",
)
def relative(s: UriSubject) -> str | None:
    """RFC 6749 §3.1.2: "The redirection endpoint URI MUST be an absolute URI".

    A relative reference would be resolved against whatever page the browser is on.

    Anti-pattern: ``/oauth/callback`` or ``//app.example.com/cb``.
    Fix: ``https://app.example.com/oauth/callback``.
    """
    if s.scheme is None:
        return "relative reference without a scheme; redirect URIs must be absolute"
    return None


@_uri_rule(
    "RU003",
    "fragment",
    Severity.ERROR,
    summary="The URI contains a fragment ('#'), even an empty one.",
    rfc="RFC 6749 §3.1.2",
    stage="parsed",
)
def fragment(s: UriSubject) -> str | None:
    """RFC 6749 §3.1.2: "The endpoint URI MUST NOT include a fragment component".

    Anti-pattern: ``https://app.example.com/cb#`` or ``https://app.example.com/#/callback``.
    Fix: ``https://app.example.com/cb``; a single-page app routes on the path or query instead.
    """
    if s.parsed is None or s.parsed.fragment is None:
        return None
    if not s.parsed.fragment:
        return "empty fragment '#'; redirect URIs must not have a fragment"
    return "fragment after '#'; redirect URIs must not have a fragment"


@_uri_rule(
    "RU004",
    "wildcard",
    Severity.ERROR,
    summary="The URI contains '*' in the scheme, authority or path, as its last character, "
    "or a host that percent-decodes to '*'.",
    rfc="RFC 9700 §4.1.3, §2.1",
    stage="always",
)
def wildcard(s: UriSubject) -> str | None:
    """RFC 9700 §2.1 and §4.1.3: redirect URIs are compared by exact string matching; pattern
    matching enabled open redirects and code theft through attacker-controlled subdomains.

    ``*`` is a legal sub-delimiter in RFC 3986, so the rule is decided by where a server could
    read it as a pattern. Servers that accept patterns put them in the host (``*.example.com``)
    and the path (``/cb/*``), and several treat a final ``*`` as "any suffix", whatever component
    it ends: those are flagged, and ``%2A`` in the host too because a host decodes to the same
    name. Inside the query (``?scope=a*b&x=1``) or the fragment (an error of its own, RU003) a
    ``*`` that does not end the URI is a literal under exact matching and no known matcher
    expands it there, so it is not flagged.

    Anti-pattern: ``https://*.example.com/cb``, ``https://app.example.com/*``,
    ``https://%2A.example.com/cb``, ``https://app.example.com/cb?tenant=*``.
    Fix: register each host and path exactly: ``https://eu.example.com/cb``,
    ``https://us.example.com/cb``.
    """
    raw = s.raw
    star = raw.find("*")
    if star >= 0:
        if raw.endswith("*"):
            return (
                f"'*' at position {len(raw) - 1} ends the URI; redirect URIs are matched "
                "exactly, not as prefixes"
            )
        m = _SPLIT_RE.fullmatch(raw)
        literal_from = (
            len(raw)
            if m is None
            else min((m.start(g) for g in (4, 5) if m.start(g) >= 0), default=len(raw))
        )
        if star < literal_from:
            return f"'*' at position {star}; redirect URIs are matched exactly, not as patterns"
    host = s.parsed.host if s.parsed is not None else None
    if host and "%" in host and ("%2a" in host or "%2A" in host):
        return "host percent-decodes to '*'; redirect URIs are matched exactly, not as patterns"
    return None


@_uri_rule(
    "RU005",
    "userinfo",
    Severity.ERROR,
    summary="The URI has userinfo before '@' (user, user:password or empty).",
    rfc="RFC 9110 §4.2.4; RFC 3986 §3.2.1",
    stage="parsed",
)
def userinfo(s: UriSubject) -> str | None:
    """RFC 9110 §4.2.4: a sender MUST NOT generate the userinfo subcomponent in http(s) URIs;
    RFC 3986 §3.2.1 deprecates ``user:password``. Userinfo also makes
    ``https://app.example.com@evil.example/`` look like a trusted host.

    Anti-pattern: ``https://user:pass@app.example.com/cb``, ``https://@app.example.com/cb``.
    Fix: ``https://app.example.com/cb``.
    """
    if s.parsed is None or s.parsed.userinfo is None:
        return None
    if not s.parsed.userinfo:
        return "empty userinfo before '@'; redirect URIs must not have userinfo"
    return "userinfo before '@' in the authority; redirect URIs must not carry credentials"


@_uri_rule(
    "RU006",
    "forbidden-scheme",
    Severity.ERROR,
    summary="The scheme is javascript, vbscript, data, blob, file or about.",
    rfc="RFC 9700 §4.1; RFC 6749 §10.6",
    stage="absolute",
)
def forbidden_scheme(s: UriSubject) -> str | None:
    """A redirect to these schemes runs script or renders attacker-chosen content in the
    browser, reads local files or addresses no endpoint at all, so the code or token in the
    response is lost or stolen (RFC 9700 §4.1, RFC 6749 §10.6). No client has a legitimate
    callback there.

    Anti-pattern: ``javascript:alert(document.cookie)``, ``data:text/html,...``,
    ``file:///tmp/cb.html``.
    Fix: an https endpoint (web) or a loopback or private-use redirect (native, RFC 8252 §7).
    """
    if s.scheme in _FORBIDDEN_SCHEMES:
        return f"'{s.scheme}:' URIs are never valid redirect targets"
    return None


@_uri_rule(
    "RU007",
    "oob",
    Severity.ERROR,
    summary="The out-of-band value urn:ietf:wg:oauth:2.0:oob (or :auto).",
    rfc="RFC 8252 §7",
    stage="absolute",
)
def oob(s: UriSubject) -> str | None:
    """The out-of-band "redirect" asks the user to copy the code by hand. It is not in any
    OAuth RFC, is phishable (the code is shown to whoever runs the flow) and has been removed
    by major providers. Native apps redirect through loopback or private-use URIs
    (RFC 8252 §7).

    Anti-pattern: ``urn:ietf:wg:oauth:2.0:oob``, ``urn:ietf:wg:oauth:2.0:oob:auto``.
    Fix: ``http://127.0.0.1/callback`` (any port at request time) or
    ``com.example.app:/oauth2redirect``.
    """
    if _is_oob(s):
        return "out-of-band redirect (urn:ietf:wg:oauth:2.0:oob) is not supported"
    return None


@_uri_rule(
    "RU008",
    "https-required",
    Severity.ERROR,
    summary="A web application uses a scheme other than https.",
    rfc="RFC 6749 §3.1.2.1; RFC 9700 §2.6",
    stage="absolute",
    app_types=(AppType.WEB,),
)
def https_required(s: UriSubject) -> str | None:
    """RFC 6749 §3.1.2.1: the redirection endpoint SHOULD require TLS when the response
    carries a code or token; RFC 9700 §2.6 makes this a must for the code flow. Codes sent over
    plain http can be read or replaced on the network.

    Anti-pattern (web app): ``http://app.example.com/cb``, ``com.example.app:/cb``.
    Fix: ``https://app.example.com/cb``; an app that really runs on the device is registered as
    ``native``.
    """
    if s.app_type is not AppType.WEB or s.scheme == "https":
        return None
    if s.scheme in _FORBIDDEN_SCHEMES or _is_oob(s):
        return None  # RU006 / RU007 say it better
    return f"web applications must use https, not {s.scheme}"


@_uri_rule(
    "RU009",
    "http-not-loopback",
    Severity.ERROR,
    summary="A native application uses http to a host other than 127.0.0.1 or [::1].",
    rfc="RFC 8252 §7.3, §8.3",
    stage="absolute",
    app_types=(AppType.NATIVE,),
)
def http_not_loopback(s: UriSubject) -> str | None:
    """RFC 8252 §7.3 allows plain http only to the loopback interface, written as the IP
    literal ``127.0.0.1`` or ``[::1]``; anywhere else the code crosses a network unencrypted.
    Other 127.0.0.0/8 addresses are flagged too: the RFC names those two literals, and
    listeners and firewalls rarely treat 127.0.0.2 the same way.

    Anti-pattern (native app): ``http://example.com/cb``, ``http://192.168.1.10:8080/cb``,
    ``http://127.0.0.2/cb``, ``http://127.1/cb``.
    Fix: ``http://127.0.0.1/cb`` or ``http://[::1]/cb`` (the port may vary at request time),
    or a private-use scheme ``com.example.app:/cb``.
    """
    if s.app_type is not AppType.NATIVE or s.scheme != "http":
        return None
    host = s.host
    if host in _LOOPBACK_LITERALS or host in _LOCALHOST_NAMES or not host:
        return None  # localhost is RU010; a missing host is RU001
    if _is_loopback_ip(host):
        return f"http to {host}; RFC 8252 §7.3 loopback redirects use 127.0.0.1 or [::1]"
    address = _browser_ipv4_text(host)
    if address is not None and address.startswith("127."):
        return (
            f"http to '{host}', which a browser reads as {address}; RFC 8252 §7.3 loopback "
            "redirects are written 127.0.0.1 or [::1]"
        )
    return f"http to '{host}', which is not the loopback interface"


@_uri_rule(
    "RU010",
    "localhost-name",
    Severity.WARNING,
    summary="A native application redirects to the name localhost instead of a loopback IP.",
    rfc="RFC 8252 §8.3",
    stage="absolute",
    app_types=(AppType.NATIVE,),
)
def localhost_name(s: UriSubject) -> str | None:
    """RFC 8252 §8.3: using ``localhost`` is NOT RECOMMENDED. A loopback IP literal avoids
    listening on interfaces other than loopback and is less exposed to client-side firewalls
    and misconfigured host name resolution (the name may not resolve to the address the app
    listens on).

    Anti-pattern (native app): ``http://localhost:8080/cb``, ``http://LOCALHOST./cb``.
    Fix: ``http://127.0.0.1:8080/cb`` or ``http://[::1]:8080/cb``.
    """
    if s.app_type is not AppType.NATIVE or s.scheme not in _HTTP_SCHEMES:
        return None
    if s.host in _LOCALHOST_NAMES:
        return f"'{s.host}' is a name; use the loopback IP literal 127.0.0.1 or [::1]"
    return None


@_uri_rule(
    "RU011",
    "https-loopback",
    Severity.WARNING,
    summary="A native application uses https to a loopback IP literal.",
    rfc="RFC 8252 §7.3, §8.3",
    stage="absolute",
    app_types=(AppType.NATIVE,),
)
def https_loopback(s: UriSubject) -> str | None:
    """RFC 8252 §7.3: loopback redirects use the http scheme; §8.3: that is acceptable because
    the request never leaves the device. No public certificate exists for 127.0.0.1, so an
    https listener there fails or relies on a self-signed certificate the browser rejects.

    Anti-pattern (native app): ``https://127.0.0.1:8443/cb``, ``https://[::1]/cb``.
    Fix: ``http://127.0.0.1:8443/cb``.
    """
    if s.app_type is AppType.NATIVE and s.scheme == "https" and _is_loopback_ip(s.host):
        return f"https to loopback {s.host}; loopback redirects use http"
    return None


@_uri_rule(
    "RU012",
    "private-scheme-not-reverse-domain",
    Severity.ERROR,
    summary="A native private-use URI scheme is not a reverse domain name (no '.').",
    rfc="RFC 8252 §7.1, §8.4",
    stage="absolute",
    app_types=(AppType.NATIVE,),
)
def private_scheme_not_reverse_domain(s: UriSubject) -> str | None:
    """RFC 8252 §7.1: apps MUST use a private-use scheme based on a domain name they control,
    reversed; §8.4: at a minimum, a private-use scheme without a period SHOULD be rejected.
    Short names like ``myapp`` collide between apps, so another app can receive the code.

    Anti-pattern (native app): ``myapp:/callback``, ``fb:/callback``.
    Fix: ``com.example.myapp:/callback``.
    """
    if s.app_type is not AppType.NATIVE or not _is_private_use(s):
        return None
    if s.scheme is not None and "." not in s.scheme:
        return f"private-use scheme '{s.scheme}' is not a reverse domain name"
    return None


@_uri_rule(
    "RU013",
    "private-scheme-form",
    Severity.WARNING,
    summary="A native private-use URI is not of the form scheme:/path.",
    rfc="RFC 8252 §7.1",
    stage="absolute",
    app_types=(AppType.NATIVE,),
)
def private_scheme_form(s: UriSubject) -> str | None:
    """RFC 8252 §7.1: "as there is no naming authority for private-use URI scheme redirects,
    only a single slash ("/") appears after the scheme component", as in
    ``com.example.app:/oauth2redirect/example-provider``. With ``//`` the first segment becomes
    a host, which platforms and matchers treat inconsistently; without any slash the path is
    opaque; with nothing after the colon there is no path at all.

    All of these deviations, the empty path included, are one warning: the URI is still an
    absolute URI (RFC 3986 §3, ``path-empty``), the operating system still dispatches it on
    the scheme alone, and exact matching still holds, so none of them sends the code anywhere
    else; the scheme itself is checked by RU012.

    Anti-pattern (native app): ``com.example.app://callback``, ``com.example.app:callback``,
    ``com.example.app:``.
    Fix: ``com.example.app:/callback``.
    """
    if s.app_type is not AppType.NATIVE or not _is_private_use(s) or s.parsed is None:
        return None
    if s.parsed.has_authority:
        return f"'{s.scheme}://' has an authority; use the form {s.scheme}:/path"
    if not s.path:
        return f"no path after '{s.scheme}:'; use the form {s.scheme}:/path"
    if not s.path.startswith("/"):
        return f"path does not start with '/'; use the form {s.scheme}:/path"
    return None


@_uri_rule(
    "RU014",
    "not-normalized",
    Severity.INFO,
    summary="The stored form differs from its RFC 3986 normalized form.",
    rfc="RFC 3986 §6.2.2, §6.2.3",
    stage="absolute",
)
def not_normalized(s: UriSubject) -> str | None:
    """Redirect URIs are compared as strings (RFC 9700 §4.1.3), so two spellings of one URI
    are two different registrations. Storing the normal form (RFC 3986 §6.2.2-§6.2.3) makes
    comparisons and duplicate detection reliable. In a stored ``redirect_uris`` value, a line
    with surrounding spaces, tabs or a carriage return (checked stripped) and a blank line are
    reported under this code too.

    Anti-pattern: ``HTTPS://App.Example.com:443/a/./cb``, ``https://app.example.com``,
    ``https://app.example.com/%7euser``.
    Fix: ``https://app.example.com/a/cb``, ``https://app.example.com/``,
    ``https://app.example.com/~user``.
    """
    if s.normalized is not None and s.normalized != s.raw:
        return f"normalized form is {s.normalized}"
    return None


@_uri_rule(
    "RU016",
    "too-long-for-grant",
    Severity.WARNING,
    summary="The URI is longer than the grant's redirect_uri column can hold.",
    rfc="RFC 6749 §4.1.3",
    stage="always",
)
def too_long_for_grant(s: UriSubject) -> str | None:
    """RFC 6749 §4.1.3: the token request must repeat the redirect_uri bound to the code, so the
    grant row stores it. A URI longer than that column (``varchar(255)`` by default) makes
    every authorization fail when the grant is saved.

    Anti-pattern: a 300-character ``https://app.example.com/cb?state_template=...``.
    Fix: a short, fixed callback such as ``https://app.example.com/cb``; carry per-request data
    in ``state``.
    """
    if s.max_length is not None and len(s.raw) > s.max_length:
        return f"{len(s.raw)} characters; the grant's redirect_uri column holds {s.max_length}"
    return None


def _browser_ipv4_text(host: str | None) -> str | None:
    """The dotted quad a browser reads a registered-name ``host`` as, if it reads an IPv4
    address there (WHATWG URL), else None."""
    if not host or host[0] == "[" or not ends_in_a_number(host):
        return None
    address = browser_ipv4(host)
    return None if address is None else ipv4_text(address)


@_uri_rule(
    "RU017",
    "non-canonical-ipv4",
    Severity.ERROR,
    summary="The http(s) host is an IPv4 address to a browser, but not written as the "
    "canonical dotted quad (127.1, 0x7f000001, 2130706433, 0177.0.0.1, 127.0.0.1.).",
    rfc="RFC 3986 §3.2.2, §7.4; RFC 8252 §7.3; WHATWG URL §3.5",
    stage="absolute",
)
def non_canonical_ipv4(s: UriSubject) -> str | None:
    """RFC 3986 §3.2.2 defines an IPv4 literal as four decimal octets without leading zeros,
    and §7.4 warns that the system routines many implementations use to translate it "often
    allow and process a much larger set of formats". Browsers follow the WHATWG URL Standard,
    whose host parser sends any host that "ends in a number" to an IPv4 parser accepting 1-4
    parts in decimal, octal (``0`` prefix) or hex (``0x``) and one trailing dot: ``127.1``,
    ``0x7f000001``, ``2130706433`` and ``0177.0.0.1`` all reach 127.0.0.1. The reviewed text
    then names one host and the browser connects to another, and RFC 8252 §7.3 names the
    literals loopback redirects use (``127.0.0.1``, ``[::1]``). This is an error for every
    application type.

    Anti-pattern: ``https://127.1/cb``, ``https://0x7f000001/cb``, ``https://2130706433/cb``,
    ``https://0177.0.0.1/cb``, ``http://127.0.0.1./cb``.
    Fix: the canonical dotted quad, ``http://127.0.0.1/cb`` (or a host name).
    """
    if s.scheme not in _HTTP_SCHEMES or s.parsed is None:
        return None
    address = _browser_ipv4_text(s.host)
    if address is None or address == s.host:
        return None
    return (
        f"a browser reads host '{s.host}' as the IPv4 address {address} (WHATWG URL); "
        f"write it as {address}"
    )


@_uri_rule(
    "RU018",
    "invalid-host",
    Severity.ERROR,
    summary="The host is one no browser or DNS accepts: an IPv4-like name that is not an "
    "address, an IPvFuture literal, an invalid A-label, an empty label, a label that starts "
    "or ends with a hyphen, a label over 63 or a name over 253 characters.",
    rfc="RFC 1034 §3.1; RFC 1123 §2.1; RFC 5891 §4.2.3, §5.4; RFC 3986 §3.2.2; WHATWG URL §3.5",
    stage="absolute",
)
def invalid_host(s: UriSubject) -> str | None:
    """A host that cannot be reached is a redirect nobody can complete, and what a lenient
    component does with it (repair, truncate, resolve differently) is not what was reviewed.

    A host that ends in a number goes to the browser's IPv4 parser (WHATWG URL §3.5), which
    fails on ``256.256.256.256``, ``1.2.3.4.5``, ``1.2.3.09`` or ``app.example.123``.
    IPvFuture literals (RFC 3986 §3.2.2, ``[v1.fe80::1]``) name no deployed protocol, and the
    WHATWG host parser rejects every bracketed host that is not IPv6. RFC 1034 §3.1 limits
    labels to 63 octets and a name to 255 octets on the wire, which is 253 characters of text
    without the final dot (one trailing dot, the root, is allowed), and an empty label
    (``a..example``, ``.example``) is not a name. RFC 1123 §2.1 (after RFC 952) forbids a
    hyphen at the start or end of a label, as RFC 5891 §4.2.3.1 does for IDNA labels. An
    ``xn--`` label must be a valid A-label: Punycode that decodes to a valid IDNA2008 U-label
    and encodes back to the same text (RFC 5890 §2.3.2.1, RFC 5891 §5.4); ``xn--zz`` is not.
    Other ASCII labels are not held to the letter-digit-hyphen rule: DNS and browsers accept
    ``_`` and reserved labels such as ``ab--cd``.

    Anti-pattern: ``https://256.256.256.256/cb``, ``https://[v1.fe80::1]/cb``,
    ``https://xn--zz.example/cb``, ``https://-app.example.com/cb``, ``https://a..example/cb``,
    a 64-character label.
    Fix: the real host name, ``https://app.example.com/cb``.
    """
    parsed = s.parsed
    if parsed is None or not parsed.has_authority:
        return None
    if parsed.host_kind == "ipvfuture":
        return f"IPvFuture literal {parsed.host}; no browser or resolver supports it"
    host = s.host
    if s.scheme not in _HTTP_SCHEMES or not host or parsed.host_kind == "ipv6":
        return None
    if host[0] == "[":  # pragma: no cover - only IP literals are bracketed
        return None
    if ends_in_a_number(host):
        if browser_ipv4(host) is None:
            return (
                f"host '{host}' ends in a number, so a browser parses it as an IPv4 address, "
                "and it is not one (WHATWG URL)"
            )
        return None  # an address: canonical, or RU017
    if "%" in host:
        return None  # only %2A is left here (RU004); every other encoding is RU001
    return dns_host_problem(host)


@_uri_rule(
    "RU019",
    "secret-parameter",
    Severity.ERROR,
    summary="A query or fragment parameter carries a secret by its name (client_secret, "
    "access_token, password, token, code, api_key, ...).",
    rfc="RFC 6750 §5.3; RFC 9700 §4.3; RFC 6749 §3.1.2, §10.3",
    stage="always",
)
def secret_parameter(s: UriSubject) -> str | None:
    """The authorization server sends the registered redirect URI, query included (RFC 6749
    §3.1.2: the query "MUST be retained"), to every browser it redirects; from there it lands
    in browser history, server and proxy logs and the ``Referer`` header of the next request
    (RFC 9700 §4.3). A secret in it is no secret: RFC 6750 §5.3 says bearer tokens must not be
    passed in page URLs, and RFC 6749 §10.3 that access tokens must be kept confidential in
    transit and storage. The parameter names that count are listed in docs/rules.md; they are
    compared percent-decoded and case-insensitively, in the query and in the fragment. Findings
    and reports never show the value (it is masked as ``***``).

    Anti-pattern: ``https://app.example.com/cb?client_secret=s3cr3t``,
    ``https://app.example.com/cb?api_key=abc``, ``https://app.example.com/cb#access_token=x``.
    Fix: ``https://app.example.com/cb``, with the secret rotated (it has been disclosed) and
    kept on the client's server side.
    """
    m = _SPLIT_RE.fullmatch(s.raw)
    if m is None:  # pragma: no cover - the pattern matches any string
        return None
    names: list[str] = []
    for group, where in ((4, "query"), (5, "fragment")):
        part = m.group(group)
        if not part:
            continue
        # A fragment may hold a path and its own query (#/cb?token=...): every '?' starts one.
        for piece in re.split(r"[&;?]", part):
            name, eq, value = piece.partition("=")
            if eq and value and is_secret_uri_param(name):
                names.append(f"{where} parameter '{mask_uri(name)}'")
    if not names:
        return None
    unique = list(dict.fromkeys(names))
    if len(unique) == 1:
        return (
            f"{unique[0]} carries a secret: the authorization server sends it to every browser "
            "it redirects (its value is not shown; rotate it)"
        )
    return (
        f"{', '.join(unique)} carry secrets: the authorization server sends them to every "
        "browser it redirects (their values are not shown; rotate them)"
    )


# --- application rules -----------------------------------------------------------------------


@_app_rule(
    "RU015",
    "duplicate",
    Severity.INFO,
    summary="The same URI appears twice in one application after normalization.",
    rfc="RFC 3986 §6.2",
)
def duplicate(a: _AppSubject) -> list[_AppHit]:
    """Two lines that normalize to the same URI (RFC 3986 §6.2) are one registration; the
    copy only hides which spelling clients actually send.

    Anti-pattern: ``https://app.example.com/cb`` and ``HTTPS://app.example.com:443/cb``.
    Fix: keep one line, in normalized form.
    """
    out: list[_AppHit] = []
    seen: dict[str, int] = {}
    for entry in a.entries:
        key = entry.subject.normalized or entry.uri
        first = seen.setdefault(key, entry.line)
        if first != entry.line:
            out.append(
                (
                    entry.uri,
                    entry.subject.normalized,
                    f"line {entry.line} repeats line {first}",
                    entry.line,
                )
            )
    return out


@_app_rule(
    "RU101",
    "no-redirect-uris",
    Severity.ERROR,
    summary="An application that can use the authorization code grant has no redirect URI.",
    rfc="RFC 6749 §3.1.2.2; RFC 9700 §2.1",
)
def no_redirect_uris(a: _AppSubject) -> list[_AppHit]:
    """RFC 6749 §3.1.2.2 requires public clients and clients of the implicit grant to register
    redirect URIs, and RFC 9700 §2.1 requires exact registration for every client. Without one
    the server would have to trust the redirect_uri of the request.

    Anti-pattern: ``redirect_uris = ''`` on an application allowed to use
    ``authorization_code``.
    Fix: register the exact callback(s), or drop ``authorization_code`` from its grant types.
    """
    if a.can_use_code_grant and not a.entries:
        return [(None, None, "no redirect URIs registered for an authorization code client", None)]
    return []


@_app_rule(
    "RU102",
    "mixed-app-type",
    Severity.WARNING,
    summary="One application has both web-style and native-style redirect URIs.",
    rfc="RFC 8252 §8.4; OpenID Connect Registration §2 (application_type)",
)
def mixed_app_type(a: _AppSubject) -> list[_AppHit]:
    """A client is either web or native (OpenID Connect Registration ``application_type``);
    the rules for each differ (https everywhere vs loopback and private-use URIs,
    RFC 8252 §8.4). A client registered as both gets the weaker rules of each.

    Anti-pattern: ``https://app.example.com/cb`` and ``http://127.0.0.1/cb`` on one client.
    Fix: register two clients, one web and one native.
    """
    web = next((e for e in a.entries if e.style == "web"), None)
    native = next((e for e in a.entries if e.style == "native"), None)
    if web is None or native is None:
        return []
    return [
        (
            None,
            None,
            f"web-style URI on line {web.line} and native-style URI on line {native.line}",
            None,
        )
    ]


@_app_rule(
    "RU103",
    "grant-redirect-unregistered",
    Severity.WARNING,
    summary="A live grant is bound to a redirect URI its application no longer registers.",
    rfc="RFC 6749 §4.1.3",
)
def grant_redirect_unregistered(a: _AppSubject) -> list[_AppHit]:
    """RFC 6749 §4.1.3: the token request must carry the same redirect_uri as the authorization
    request. A live grant bound to a URI that is no longer registered can still be exchanged by
    a server that only compares the two requests, so removing a URI does not fully retire it
    until its grants expire.

    Anti-pattern: removing ``https://old.example.com/cb`` while codes issued to it are live.
    Fix: wait for the grants to expire (10 minutes) or delete them, then remove the URI.
    """
    registered = {entry.uri for entry in a.entries}
    return [
        (
            uri,
            None,
            "a live grant is bound to this URI, which the application no longer registers",
            None,
        )
        for uri in dict.fromkeys(a.live_grant_uris)
        if uri not in registered
    ]


@_app_rule(
    "RU104",
    "native-with-secret",
    Severity.INFO,
    summary="A native application holds a client secret, which cannot stay confidential.",
    rfc="RFC 8252 §8.5",
)
def native_with_secret(a: _AppSubject) -> list[_AppHit]:
    """RFC 8252 §8.5: secrets shipped in native apps are not confidential; the client is public
    and must rely on PKCE, not on the secret.

    Anti-pattern: a desktop app with ``client_secret`` compiled into the binary.
    Fix: treat the client as public (``token_endpoint_auth_method = none``) and require PKCE.
    """
    if a.app_type is AppType.NATIVE and a.has_secret:
        return [
            (None, None, "a native application cannot keep its client secret confidential", None)
        ]
    return []


@_app_rule(
    "RU111",
    "app-type-mismatch",
    Severity.WARNING,
    summary="The stored application_type disagrees with the style of the redirect URIs.",
    rfc="OpenID Connect Registration §2 (application_type); RFC 8252 §8.4",
)
def app_type_mismatch(a: _AppSubject) -> list[_AppHit]:
    """The stored ``application_type`` decides which redirect rules apply (https everywhere
    for ``web``; loopback and private-use URIs for ``native``, RFC 8252 §8.4). A type that
    disagrees with every URI the client registered holds it to the wrong rules. The
    compatibility layer (the phase while the provider's old code still creates applications)
    stores the safe default ``web`` for applications it cannot classify in SQL; this rule lists
    the ones that need review.

    Anti-pattern: ``application_type = 'web'`` on a client whose only redirect URI is
    ``http://127.0.0.1/cb``.
    Fix: set ``application_type`` to what the client is (``native`` here).
    """
    styles = {e.style for e in a.entries} - {"unknown"}
    if a.app_type is AppType.WEB and styles == {"native"}:
        message = "stored as web, but every redirect URI is native-style: review the type"
    elif a.app_type is AppType.NATIVE and styles == {"web"}:
        message = "stored as native, but every redirect URI is web-style: review the type"
    else:
        return []
    return [(None, None, message, None)]


# Evaluation plans, built once: which rules run, per app type, in code order.
_RuleList = tuple[tuple[Rule, UriCheck], ...]


def _plan(*stages: _Stage) -> dict[AppType, _RuleList]:
    """The rules of these stages that apply to each app type, in code order."""
    return {
        app: tuple(
            sorted(
                (
                    (rule, check)
                    for stage in stages
                    for rule, check, apps in _URI_CHECKS[stage]
                    if app in apps
                ),
                key=lambda item: item[0].code,
            )
        )
        for app in AppType
    }


_GATE = _plan("gate")
_ALWAYS = _plan("always")  # all that runs once RU001 has fired
_RELATIVE_PLAN = _plan("parsed", "always")
_ABSOLUTE_PLAN = _plan("parsed", "absolute", "always")
_APP = tuple(_APP_CHECKS)
# The client metadata rules (RU105-RU110, oauthmig.redirects.metadata_rules) are part of the
# one registry every reader sees (audit summaries, SARIF, the docs/rules.md checks).
if set(RULES) & set(METADATA_RULES):  # pragma: no cover - guards the registry while editing
    raise RuntimeError(f"duplicate rule codes {sorted(set(RULES) & set(METADATA_RULES))}")
_BY_CODE = sorted([*RULES.items(), *METADATA_RULES.items()])
RULES.clear()
RULES.update(_BY_CODE)
del _BY_CODE

_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}
_VERDICTS: tuple[Verdict, Verdict, Verdict] = ("pass", "warn", "fail")


# StrEnum members hash like their values, so this maps "web" and AppType.WEB alike.
_APP_TYPES: dict[str, AppType] = {app.value: app for app in AppType}


def _coerce_app_type(app_type: AppType | str) -> AppType:
    found = _APP_TYPES.get(app_type)
    return found if found is not None else AppType(app_type)  # ValueError if unknown


def _subject(raw: str, app_type: AppType, max_length: int | None) -> UriSubject:
    try:
        parsed = parse_uri(raw)
    except URIError as exc:
        return UriSubject(raw, app_type, None, exc.reason, None, None, "", None, max_length)
    scheme = parsed.scheme
    if scheme is None:
        return UriSubject(raw, app_type, parsed, None, None, None, parsed.path, None, max_length)
    scheme = scheme.lower()
    if scheme in _HTTP_SCHEMES and not parsed.host:
        # RU001 fires; there is no meaningful normal form.
        return UriSubject(raw, app_type, parsed, None, scheme, None, parsed.path, None, max_length)
    host, path, normalized = normalize_components(parsed)
    return UriSubject(raw, app_type, parsed, None, scheme, host, path, normalized, max_length)


def _verdict(severities: Iterable[Severity]) -> Verdict:
    worst = 0
    for severity in severities:
        rank = _SEVERITY_RANK[severity]
        if rank > worst:
            worst = rank
    return _VERDICTS[worst]


# check_uri builds one report per URI; like uri.parse_uri it writes the slots of these frozen
# dataclasses directly, which is several times cheaper than their generated __init__.
_NEW = object.__new__
_SET_CODE, _SET_NAME, _SET_SEVERITY, _SET_MESSAGE = (
    vars(Finding)[name].__set__ for name in Finding.__dataclass_fields__
)
_SET_URI, _SET_APP_TYPE, _SET_VERDICT, _SET_NORMALIZED, _SET_FINDINGS = (
    vars(UriReport)[name].__set__ for name in UriReport.__dataclass_fields__
)


def _finding(rule: Rule, message: str) -> Finding:
    finding: Finding = _NEW(Finding)
    _SET_CODE(finding, rule.code)
    _SET_NAME(finding, rule.name)
    _SET_SEVERITY(finding, rule.severity)
    _SET_MESSAGE(finding, message)
    return finding


def _evaluate(s: UriSubject) -> UriReport:
    app = s.app_type
    findings: list[Finding] = []
    for rule, check in _GATE[app]:
        message = check(s)
        if message is not None:
            findings.append(_finding(rule, message))
    if findings:
        plan = _ALWAYS[app]
    elif s.scheme is None:
        plan = _RELATIVE_PLAN[app]
    else:
        plan = _ABSOLUTE_PLAN[app]
    for rule, check in plan:
        message = check(s)
        if message is not None:
            findings.append(_finding(rule, message))
    report: UriReport = _NEW(UriReport)
    _SET_URI(report, s.raw)
    _SET_APP_TYPE(report, app)
    _SET_VERDICT(report, _verdict([f.severity for f in findings]) if findings else "pass")
    _SET_NORMALIZED(report, s.normalized)
    _SET_FINDINGS(report, tuple(findings))
    return report


def check_uri(
    uri: str,
    app_type: AppType | str,
    *,
    grant_column_length: int | None = GRANT_REDIRECT_URI_LENGTH,
) -> UriReport:
    """Check one redirect URI as registration would, for a ``web`` or ``native`` application.

    ``grant_column_length`` is the size of the grant's ``redirect_uri`` column (None: no
    limit, RU016 never fires). Never raises on any string ``uri``; an unknown ``app_type``
    raises ValueError.
    """
    app = _coerce_app_type(app_type)
    return _evaluate(_subject(uri, app, grant_column_length))


def _style(s: UriSubject) -> UriStyle:
    if s.parsed is None or s.scheme is None:
        return "unknown"
    if s.scheme in _HTTP_SCHEMES:
        if not s.host:
            return "unknown"
        # A loopback redirect only reaches an app on the user's own device (RFC 8252 §7.3), so
        # https to loopback is native-style too (it then gets RU011 rather than passing as web).
        if _is_loopback_ip(s.host) or s.host in _LOCALHOST_NAMES:
            return "native"
        return "web"
    if s.scheme in _FORBIDDEN_SCHEMES:
        return "unknown"
    return "native"  # private-use schemes, and the out-of-band URN of installed apps


# Only these are stripped from a stored line; any other whitespace stays and fails RU001.
_STRIP = " \t\r"


def classify_uri_style(uri: str) -> UriStyle:
    """Whether a redirect URI looks like a web or a native application's.

    ``native``: a private-use scheme (including the out-of-band URN), or http(s) to a loopback
    IP literal (127.0.0.0/8, [::1]) or to ``localhost``. ``web``: http(s) to any other host.
    ``unknown``: not an absolute URI, no host, or a forbidden scheme (RU006).
    """
    return _style(_subject(uri, AppType.WEB, None))


def infer_app_type(uris: Iterable[str]) -> AppType:
    """The ``application_type`` implied by an application's redirect URIs.

    ``native`` when at least one URI is native-style and none is web-style (URIs whose style is
    ``unknown`` do not count either way, and blank values are skipped); ``web`` otherwise,
    including for mixed applications (which get RU102) and for an empty list. A client secret
    never decides the type: legacy native apps often hold one (RFC 8252 §8.5).
    """
    native = False
    for uri in uris:
        value = uri.strip(_STRIP)
        if not value:
            continue
        style = classify_uri_style(value)
        if style == "web":
            return AppType.WEB
        if style == "native":
            native = True
    return AppType.NATIVE if native else AppType.WEB


def _stored_lines(text: str | None) -> list[tuple[int, str]]:
    if not text:
        return []
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # a final newline terminates the last line; it is not a blank line
    return list(enumerate(lines, start=1))


def split_redirect_uris(text: str | None) -> list[str]:
    """The redirect URIs of a stored ``redirect_uris`` value: one per line (``\\n`` or
    ``\\r\\n``), stripped of surrounding spaces and tabs, blank lines dropped."""
    return [v for _, line in _stored_lines(text) if (v := line.strip(_STRIP))]


def _with_extra(report: UriReport, extra: Finding) -> UriReport:
    findings = tuple(sorted((*report.findings, extra), key=lambda f: f.code))
    return UriReport(report.uri, report.app_type, report.verdict, report.normalized, findings)


def check_application(
    uris_text: str | None,
    app_type: AppType | str,
    *,
    has_secret: bool,
    can_use_code_grant: bool = True,
    live_grant_uris: Iterable[str] = (),
    grant_column_length: int | None = GRANT_REDIRECT_URI_LENGTH,
) -> AppReport:
    """Check every redirect URI of one application, then the application as a whole.

    ``uris_text`` is the stored newline-separated ``redirect_uris``. Each line is checked
    stripped of surrounding spaces, tabs and a carriage return; such a line also gets an RU014
    finding, and each blank line an application-level RU014 finding. ``live_grant_uris`` are
    the ``redirect_uri`` values of unexpired grants (RU103 compares them byte for byte with the
    stripped lines).
    """
    app = _coerce_app_type(app_type)
    ru014 = RULES["RU014"]
    entries: list[_Entry] = []
    reports: list[UriReport] = []
    blank: list[AppFinding] = []
    for line_no, line in _stored_lines(uris_text):
        value = line.strip(_STRIP)
        if not value:
            blank.append(
                AppFinding(
                    None,
                    None,
                    ru014.code,
                    ru014.name,
                    ru014.severity,
                    f"line {line_no} of redirect_uris is blank and was ignored",
                    line_no,
                )
            )
            continue
        subject = _subject(value, app, grant_column_length)
        report = _evaluate(subject)
        if value != line:
            what = "a carriage return" if line.rstrip("\r") == value else "surrounding whitespace"
            report = _with_extra(
                report,
                Finding(
                    ru014.code,
                    ru014.name,
                    ru014.severity,
                    f"stored line {line_no} has {what}; the stripped value was checked",
                ),
            )
        reports.append(report)
        entries.append(_Entry(line_no, value, subject, _style(subject)))

    app_subject = _AppSubject(
        app, has_secret, can_use_code_grant, tuple(entries), tuple(live_grant_uris)
    )
    findings = blank  # RU014 sorts before every application rule
    for rule, check in _APP:
        for uri, normalized, message, hit_line in check(app_subject):
            findings.append(
                AppFinding(uri, normalized, rule.code, rule.name, rule.severity, message, hit_line)
            )
    severities: list[Severity] = [f.severity for r in reports for f in r.findings]
    severities.extend(f.severity for f in findings)
    lines = tuple(entry.line for entry in entries)
    return AppReport(app, _verdict(severities), tuple(reports), tuple(findings), lines)
