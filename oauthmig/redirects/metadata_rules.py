"""Client metadata rules (RU105-RU110): the RFC 7591 §2 metadata URLs of an application and
its token endpoint authentication method.

The rules are collected in :data:`METADATA_RULES` and joined into the one registry,
:data:`oauthmig.redirects.rules.RULES` (stable codes, one ``docs/rules.md`` section each), and are
reported by ``audit-redirects`` beside the redirect URI rules. :func:`check_metadata` is pure:
it gets the stored values and returns :class:`MetadataFinding` values, never raising on any
input.

* Metadata URLs (:data:`METADATA_URL_COLUMNS`: ``client_uri``, ``policy_uri``, ``tos_uri``
  stored in Sentry's ``homepage_url``, ``privacy_url``, ``terms_url``, and ``jwks_uri``,
  ``logo_uri`` from revision 0006) must parse strictly as RFC 3986 absolute URIs with a host
  (RU105), use https (RU106), carry no userinfo (RU107) and no fragment (RU108). An empty or
  blank value is "not set". A URL that fails RU105 gets no other URL finding.
* ``private_key_jwt`` without a ``jwks_uri`` (RU109) and ``none`` on an application that holds
  a client secret (RU110).

The URL a finding shows has its userinfo replaced by ``***`` and the values of query
parameters that look like secrets (``token``, ``key``, ``secret``, ...) masked: findings are
printed and uploaded (SARIF), and a URL with credentials in it is exactly what RU107 is about.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from oauthmig.redact import mask_uri
from oauthmig.redirects.rule_types import Rule, Severity, make_rule
from oauthmig.uri import ParsedURI, URIError, normalize_uri, parse_uri

__all__ = [
    "METADATA_RULE_CODES",
    "METADATA_URL_COLUMNS",
    "MetadataFinding",
    "check_metadata",
    "display_url",
]

#: RFC 7591 §2 metadata URL name -> the Sentry application column that holds it. The three
#: legacy URL columns are reported under their RFC names rather than duplicated.
METADATA_URL_COLUMNS: Mapping[str, str] = {
    "client_uri": "homepage_url",
    "policy_uri": "privacy_url",
    "tos_uri": "terms_url",
    "jwks_uri": "jwks_uri",
    "logo_uri": "logo_uri",
}
AUTH_METHOD_COLUMN = "token_endpoint_auth_method"


@dataclass(frozen=True, slots=True)
class MetadataFinding:
    """One client metadata rule firing. ``field`` is the RFC 7591 name (``client_uri``, ...,
    ``token_endpoint_auth_method``), ``column`` the application column it is stored in; ``uri``
    is the URL concerned (masked, see :func:`display_url`), None for the auth-method rules."""

    field: str
    column: str
    uri: str | None
    normalized: str | None
    code: str
    name: str
    severity: Severity
    message: str


class _UrlSubject(NamedTuple):
    """What a metadata URL rule sees: the RFC 7591 name, the stored value and its strict
    RFC 3986 parse (None, with ``error``, when it does not parse)."""

    field: str
    value: str
    parsed: ParsedURI | None
    error: str | None


class _AppSubject(NamedTuple):
    """What an application-level metadata rule sees."""

    urls: Mapping[str, str | None]
    auth_method: str | None
    has_secret: bool
    jwks_uri_column: bool


_UrlCheck = Callable[[_UrlSubject], str | None]
_AppCheck = Callable[[_AppSubject], str | None]
#: The rules of this module by code (part of :data:`oauthmig.redirects.rules.RULES`).
METADATA_RULES: dict[str, Rule] = {}
_URL_GATE: list[tuple[Rule, _UrlCheck]] = []
_URL_CHECKS: list[tuple[Rule, _UrlCheck]] = []
_APP_CHECKS: list[tuple[Rule, _AppCheck]] = []


def _url_rule(
    code: str, name: str, severity: Severity, *, summary: str, rfc: str, gate: bool = False
) -> Callable[[_UrlCheck], _UrlCheck]:
    """Register a metadata URL rule; a ``gate`` rule (RU105) stops the others when it fires."""

    def register(func: _UrlCheck) -> _UrlCheck:
        rule = make_rule(METADATA_RULES, code, name, severity, summary, rfc, func)
        (_URL_GATE if gate else _URL_CHECKS).append((rule, func))
        return func

    return register


def _app_rule(
    code: str, name: str, severity: Severity, *, summary: str, rfc: str
) -> Callable[[_AppCheck], _AppCheck]:
    """Register an application-level metadata rule."""

    def register(func: _AppCheck) -> _AppCheck:
        _APP_CHECKS.append(
            (make_rule(METADATA_RULES, code, name, severity, summary, rfc, func), func)
        )
        return func

    return register


@_url_rule(
    "RU105",
    "metadata-url-invalid",
    Severity.ERROR,
    summary="A client metadata URL (client_uri, policy_uri, tos_uri, jwks_uri, logo_uri) is "
    "not an absolute URI with a host.",
    rfc="RFC 7591 §2; RFC 3986 §4.3",
    gate=True,
)
def metadata_url_invalid(s: _UrlSubject) -> str | None:
    """RFC 7591 §2 defines each of these as a URL that the server fetches (``jwks_uri``) or
    that users' browsers open or display (the others). One that is not an absolute RFC 3986
    URI with a host cannot be fetched, and what a lenient component makes of it (resolving it
    against the consent page, repairing it) is not what was registered. Parsing is the strict
    one of the redirect rules (RU001); the other metadata URL rules are skipped.

    Anti-pattern: ``homepage_url = 'www.example.com'``, ``logo_uri = '/static/logo.png'``,
    ``jwks_uri = 'https://keys example.com/jwks.json'``.
    Fix: the absolute https URL, ``https://www.example.com/``.
    """
    if s.parsed is None:
        return f"{s.field}: {s.error}"
    if s.parsed.scheme is None:
        return f"{s.field} is a relative URL"
    if s.parsed.scheme.lower() in ("http", "https") and not s.parsed.host:
        return f"{s.field} has no host"
    return None


@_url_rule(
    "RU106",
    "metadata-url-not-https",
    Severity.ERROR,
    summary="A client metadata URL does not use https.",
    rfc="RFC 7591 §2, §5; RFC 6749 §1.6",
)
def metadata_url_not_https(s: _UrlSubject) -> str | None:
    """A ``jwks_uri`` fetched over plain http lets anyone on the path substitute the keys that
    authenticate the client (``private_key_jwt``, RFC 7591 §2). The other URLs are shown on
    the consent screen: over http a logo is mixed content and a terms or privacy page can be
    swapped in transit, and RFC 7591 §5 warns that these URLs are how a malicious client
    deceives users. ``javascript:`` and ``data:`` URLs run in the page that renders them.

    Anti-pattern: ``jwks_uri = 'http://app.example.com/jwks.json'``,
    ``logo_uri = 'javascript:alert(1)'``.
    Fix: ``https://app.example.com/jwks.json``.
    """
    assert s.parsed is not None and s.parsed.scheme is not None  # RU105 did not fire
    scheme = s.parsed.scheme.lower()
    if scheme == "https":
        return None
    return f"{s.field} uses {scheme}:; metadata URLs must use https"


@_url_rule(
    "RU107",
    "metadata-url-userinfo",
    Severity.ERROR,
    summary="A client metadata URL has userinfo (user:password@) in its authority.",
    rfc="RFC 3986 §3.2.1, §7.6; RFC 7591 §2",
)
def metadata_url_userinfo(s: _UrlSubject) -> str | None:
    """RFC 3986 §3.2.1: "Use of the format "user:password" in the userinfo field is
    deprecated." Metadata URLs are returned in the client information response and shown to
    users, so credentials in them are disclosed to everyone who sees the client; userinfo
    also hides the real host from a reader (``https://trusted.example@evil.example/``, RFC
    3986 §7.6). Reports show such a URL with its userinfo masked.

    Anti-pattern: ``https://deploy:s3cret@app.example.com/jwks.json``.
    Fix: ``https://app.example.com/jwks.json``, served without a secret in the URL.
    """
    assert s.parsed is not None
    if s.parsed.userinfo is None:
        return None
    return f"{s.field} has userinfo in its authority (masked here)"


@_url_rule(
    "RU108",
    "metadata-url-fragment",
    Severity.WARNING,
    summary="A client metadata URL contains a fragment ('#').",
    rfc="RFC 3986 §3.5; RFC 7591 §2",
)
def metadata_url_fragment(s: _UrlSubject) -> str | None:
    """A fragment is never sent to the server that serves the URL (RFC 3986 §3.5), so it
    cannot select a key set, a logo or a policy; it only makes the registered value differ
    from what is fetched, and a value compared byte for byte (with a software statement, or
    across registrations) then no longer matches.

    Anti-pattern: ``https://app.example.com/legal#privacy`` as ``policy_uri``.
    Fix: a page of its own, ``https://app.example.com/legal/privacy``.
    """
    assert s.parsed is not None
    if s.parsed.fragment is None:
        return None
    return f"{s.field} has a fragment, which is never sent to the server"


def _is_set(value: str | None) -> bool:
    return value is not None and bool(value.strip())


@_app_rule(
    "RU109",
    "private-key-jwt-without-jwks-uri",
    Severity.ERROR,
    summary="token_endpoint_auth_method is private_key_jwt but the application has no jwks_uri.",
    rfc="RFC 7591 §2; RFC 7523 §2.2",
)
def private_key_jwt_without_jwks_uri(a: _AppSubject) -> str | None:
    """With ``private_key_jwt`` the client authenticates with a JWT signed by its private key
    (RFC 7523 §2.2), which the server verifies with the client's public keys. RFC 7591 §2 has
    the client register them as ``jwks_uri`` (or inline ``jwks``, which this schema does not
    store): without them no assertion can be verified, and every token request of the client
    fails.

    Anti-pattern: ``token_endpoint_auth_method = 'private_key_jwt'`` with ``jwks_uri`` NULL.
    Fix: set ``jwks_uri`` to the client's https key set URL (revision 0006 adds the column),
    or register the authentication method the client really uses.
    """
    if a.auth_method != "private_key_jwt" or _is_set(a.urls.get("jwks_uri")):
        return None
    hint = "" if a.jwks_uri_column else " (the jwks_uri column arrives with revision 0006)"
    return f"private_key_jwt needs the client's public keys, but no jwks_uri is set{hint}"


@_app_rule(
    "RU110",
    "auth-none-with-secret",
    Severity.WARNING,
    summary="token_endpoint_auth_method is none but the application holds a client secret.",
    rfc="RFC 7591 §2; RFC 6749 §2.1",
)
def auth_none_with_secret(a: _AppSubject) -> str | None:
    """RFC 7591 §2: ``none`` means "The client is a public client as defined in OAuth 2.0,
    Section 2.1, and does not have a client secret." A secret stored beside it is either
    never checked (it protects nothing, and the token endpoint treats the client as public)
    or a sign that the client is confidential and its method was recorded wrong.

    Anti-pattern: ``token_endpoint_auth_method = 'none'`` with ``client_secret`` set.
    Fix: for a public client, clear the secret (and require PKCE); for a confidential one,
    record the method it authenticates with (``client_secret_basic``).
    """
    if a.auth_method == "none" and a.has_secret:
        return "token_endpoint_auth_method is none, yet a client secret is stored"
    return None


#: The codes of this module, in code order.
METADATA_RULE_CODES: tuple[str, ...] = tuple(
    sorted([r.code for r, _ in _URL_GATE + _URL_CHECKS] + [r.code for r, _ in _APP_CHECKS])
)


def display_url(value: str) -> str:
    """``value`` with its userinfo and the values of secret-bearing query and fragment
    parameters replaced by ``***`` (:func:`oauthmig.redact.mask_uri`): what a finding may show."""
    return mask_uri(value)


def _finding(
    rule: Rule, field: str, uri: str | None, normalized: str | None, message: str
) -> MetadataFinding:
    column = METADATA_URL_COLUMNS.get(field, field)
    return MetadataFinding(
        field, column, uri, normalized, rule.code, rule.name, rule.severity, message
    )


def _url_findings(field: str, value: str) -> list[MetadataFinding]:
    try:
        subject = _UrlSubject(field, value, parse_uri(value), None)
    except URIError as exc:
        subject = _UrlSubject(field, value, None, exc.reason)
    shown = display_url(value)
    for rule, check in _URL_GATE:
        message = check(subject)
        if message is not None:
            return [_finding(rule, field, shown, None, message)]
    assert subject.parsed is not None
    normalized = display_url(normalize_uri(subject.parsed))
    out: list[MetadataFinding] = []
    for rule, check in _URL_CHECKS:
        message = check(subject)
        if message is not None:
            out.append(_finding(rule, field, shown, normalized, message))
    return out


def check_metadata(
    urls: Mapping[str, str | None],
    *,
    auth_method: str | None,
    has_secret: bool,
    jwks_uri_column: bool = True,
) -> list[MetadataFinding]:
    """Check one application's client metadata: URL findings per field (in
    :data:`METADATA_URL_COLUMNS` order), then the application-level ones.

    ``urls`` maps RFC 7591 names of :data:`METADATA_URL_COLUMNS` to the stored values (a name
    that is absent, None or blank is not set). ``auth_method`` is the stored
    ``token_endpoint_auth_method`` (None: unknown, the auth-method rules cannot fire);
    ``has_secret`` whether a non-empty client secret is stored; ``jwks_uri_column`` whether the
    table has the ``jwks_uri`` column yet (only changes RU109's message).
    """
    out: list[MetadataFinding] = []
    for field in METADATA_URL_COLUMNS:
        value = urls.get(field)
        if value is not None and _is_set(value):
            out.extend(_url_findings(field, value))
    subject = _AppSubject(urls, auth_method, has_secret, jwks_uri_column)
    for rule, app_check in _APP_CHECKS:
        message = app_check(subject)
        if message is not None:
            out.append(_finding(rule, AUTH_METHOD_COLUMN, None, None, message))
    return out
