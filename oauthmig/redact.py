"""Keep secrets out of everything oauthmig prints, logs, writes or stores.

Three kinds of text can carry a secret:

* **URIs.** :func:`mask_uri` is the one masking rule for every URI oauthmig prints, stores or
  exports (redirect URIs, grant URIs, metadata URLs, database and replica URLs): it replaces the
  userinfo and the value of every secret-bearing query or fragment parameter
  (:func:`is_secret_param`) with ``***``, on any text, parseable or not.
* **Database URLs.** :func:`mask_url` is :func:`mask_uri` keeping the user name: the password
  and the value of every query parameter that can carry a secret or a key (``password``,
  ``sslpassword``, ``passfile``, ``sslkey``, and any parameter whose name mentions a password,
  secret, token, key or credential) become ``***``. :func:`url_secrets` lists those values,
  so that they can also be removed from text that merely echoes them.
* **Driver error text.** PostgreSQL appends the failing row (``DETAIL: Failing row contains
  (...)``), keys (``DETAIL: Key (token)=(...)``), the statement and a ``CONTEXT`` that may quote
  values; SQLAlchemy appends ``[SQL: ...]`` and ``[parameters: ...]``; a trigger's ``RAISE`` can
  put anything in the message itself. :func:`describe_db_error` keeps only what identifies the
  failure: the SQLSTATE, the primary message, and the constraint, table, column and schema
  names. The rules are in :func:`describe_db_error` and :func:`scrub_text`.

Every driver error is turned into text by :func:`describe_db_error` (through
``oauthmig.db.describe_error``) before it reaches a message, a log record or a table; stored text
written by older versions is passed through :func:`scrub_text` again when read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote_plus

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

MASK = "***"
WITHHELD = "<redacted>"
MAX_LENGTH = 300

# libpq / psycopg parameters that carry a secret, a key, or the path to one.
SECRET_PARAMS: frozenset[str] = frozenset(
    {"password", "sslpassword", "passfile", "sslkey", "sslcert", "sslcrl", "sslrootcert", "pwd"}
)
_SECRET_PARAM_WORDS = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)

# What follows any of these in a driver message may carry row data, parameters or query text.
_CUT = re.compile(
    r"\s*(?:\b(?:DETAIL|HINT|CONTEXT|QUERY|STATEMENT|WHERE|LOCATION|LINE \d+):"
    r"|\[SQL:|\[parameters:|\(Background on this error)",
)
_SINGLE_QUOTED = re.compile(r"(?<![A-Za-z0-9])'(?:[^']|'')*'")
_DOUBLE_QUOTED = re.compile(r'"([^"]*)"')
# A name, host or number as drivers quote them; anything else in quotes may be a value.
_NAME_LIKE = re.compile(r"^[A-Za-z0-9_$.:-]{1,63}$")
# A parenthesized list of four or more items: a row image or a tuple of values.
_TUPLE = re.compile(r"\((?:[^(),]*,){3,}[^()]*\)")
_WORD = re.compile(r"[A-Za-z0-9_+/=~.-]+")
_INLINE_SECRET = re.compile(
    r"\b(password|sslpassword|passfile|sslkey|pwd)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)",
    re.IGNORECASE,
)
# SQLSTATE classes whose primary messages name objects only (integrity, locks, connections,
# privileges, resources...). Messages of any other class (22 data exceptions, P0 PL/pgSQL,
# XX internal, 38/39 external routines, 42601 syntax errors) may quote values.
_NAME_ONLY_CLASSES = frozenset(
    {"08", "0A", "23", "25", "28", "2B", "2D", "3B", "3D", "3F", "40", "42", "44", "53", "54"}
    | {"55", "57", "58", "72", "F0", "HV"}
)
_FUNCTION_CONTEXT = re.compile(r'\b(?:PL/\w+|SQL) function "?([A-Za-z_][\w$.]*)"?')


# Secret-bearing URI parameters (docs/rules.md, RU019), compared after percent-decoding,
# lowercasing and removing every character that is not a letter or a digit: these names...
SECRET_URI_PARAM_NAMES: frozenset[str] = frozenset(
    {
        "code", "key", "pass", "pwd", "secret", "token", "password", "passwd", "passphrase",
        "apikey", "assertion", "clientassertion", "jwt", "sig", "signature", "auth",
        "authorization", "session", "sessionid", "otp", "accesskey", "privatekey",
        "sslkey", "sslpassword", "passfile",
    }
)  # fmt: skip
# ... and every name ending with one of these.
SECRET_URI_PARAM_SUFFIXES: tuple[str, ...] = (
    "secret", "token", "password", "passwd", "pwd", "passphrase", "apikey", "credential",
    "credentials", "assertion", "signature", "privatekey", "secretkey", "accesskey", "signingkey",
)  # fmt: skip
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
# A name whose last word is "key" (api_key, X-Api-Key, client.key).
_LAST_WORD_KEY = re.compile(r"(?:^|[^A-Za-z0-9]|[a-z0-9](?=K))[Kk][Ee][Yy]$")


def _decoded_name(name: str) -> str:
    """``name`` percent-decoded (``+`` is a space) until it no longer changes, at most 3 times."""
    for _ in range(3):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name


def is_secret_uri_param(name: str) -> bool:
    """True for a URI query or fragment parameter that carries a secret by its name (RU019):
    one of :data:`SECRET_URI_PARAM_NAMES` or ending with one of
    :data:`SECRET_URI_PARAM_SUFFIXES` once percent-decoded, lowercased and stripped of
    everything but letters and digits (``client_secret``, ``Client-Secret``, ``client%5Fsecret``
    and ``clientSecret`` alike), or whose last word is ``key`` (``api_key``, ``X-Api-Key``)."""
    decoded = _decoded_name(name).strip()
    folded = _NOT_ALNUM.sub("", decoded.lower())
    if not folded:
        return False
    return (
        folded in SECRET_URI_PARAM_NAMES
        or folded.endswith(SECRET_URI_PARAM_SUFFIXES)
        or bool(_LAST_WORD_KEY.search(decoded))
    )


def is_secret_param(name: str) -> bool:
    """True for a URL query parameter whose value may be a secret, a key or a path to one: what
    :func:`mask_uri` masks. Broader than :func:`is_secret_uri_param` (any name mentioning a
    password, secret, token, key, credential or auth, and libpq's key and certificate paths),
    since masking a harmless value costs nothing."""
    decoded = _decoded_name(name)
    return (
        decoded.lower() in SECRET_PARAMS
        or bool(_SECRET_PARAM_WORDS.search(decoded))
        or is_secret_uri_param(decoded)
    )


# SQLAlchemy dialect names: their URLs are written by people, with raw '@', '/', '?', '#' in
# passwords, and never have an '@' in the host, port or database name.
_DB_SCHEME = re.compile(
    r"(?:postgres|postgresql|sqlite|mysql|mariadb|oracle|mssql|cockroachdb)(?:\+[\w.-]+)?:",
    re.IGNORECASE,
)
# 'user:' at the start of an authority: SQLAlchemy (and people) then read everything up to the
# next '@' as the password, '/', '?' and '#' included.
_USER_COLON = re.compile(r"[^:/?#@]*:")
_PARAM_START = re.compile(r"[?&;#]([^=?&;#]*)=")
_MAX_DEPTH = 4


def _userinfo_span(text: str) -> tuple[int, int] | None:
    """``(start, end)`` of the userinfo of a URI-ish ``text`` (``end`` is the ``@`` that closes
    it), or None. See :func:`mask_uri` for the rule."""
    slashes = text.find("//")
    if slashes < 0:
        return None
    start = slashes + 2
    if _DB_SCHEME.match(text):
        at = text.rfind("@", start)
        return (start, at) if at >= 0 else None
    authority_end = _first_of(text, "/?#", start)
    at = text.rfind("@", start, authority_end)
    if _USER_COLON.match(text, start):
        first = text.find("@", start)
        if first >= 0:
            at = max(at, text.rfind("@", first, _first_of(text, "/?#", first + 1)))
    return (start, at) if at >= 0 else None


def _first_of(text: str, chars: str, start: int) -> int:
    found = [i for i in (text.find(c, start) for c in chars) if i >= 0]
    return min(found) if found else len(text)


def _param_spans(text: str, depth: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` of every secret-bearing parameter value of ``text`` (query and
    fragment, from the first ``?`` or ``#`` on)."""
    first = _first_of(text, "?#", 0)
    if first >= len(text):
        return []
    fragment = text.find("#", first)
    db_url = _DB_SCHEME.match(text) is not None
    spans: list[tuple[int, int]] = []
    for m in _PARAM_START.finditer(text, first):
        value_start = m.end()
        if is_secret_param(m.group(1)):
            # A secret value runs to the next '&' (';' may be in it), or to the '#' that starts
            # the fragment (RFC 3986 §3.4), except in a database URL, whose query SQLAlchemy
            # reads to the end, '#' included.
            in_fragment = fragment >= 0 and value_start > fragment
            stops = "&" if in_fragment or db_url else "&#"
            spans.append((value_start, _first_of(text, stops, value_start)))
            continue
        value_end = _first_of(text, "&#", value_start)
        value = text[value_start:value_end]
        # A value that is itself a URI, raw or percent-encoded (?next=https%3A%2F%2Fu%3Ap%40h),
        # is withheld whole when it carries a secret.
        if value and depth < _MAX_DEPTH:
            decoded = _decoded_name(value)
            if _mask_uri(decoded, keep_user=False, depth=depth + 1) != decoded:
                spans.append((value_start, value_end))
    return spans


def _userinfo_mask(text: str, keep_user: bool) -> tuple[int, int] | None:
    """The part of the userinfo to mask: all of it, or (``keep_user``) the password."""
    span = _userinfo_span(text)
    if span is None or span[0] == span[1]:
        return None  # no userinfo, or an empty one ('https://@host') stays as it is
    start, at = span
    user, colon, _password = text[start:at].partition(":")
    if keep_user and _mask_uri(user, keep_user=False, depth=_MAX_DEPTH) == user:
        return (start + len(user) + 1, at) if colon else None
    return start, at


def _mask_uri(text: str, *, keep_user: bool, depth: int) -> str:
    if "@" not in text and "?" not in text and "#" not in text:
        return text  # no userinfo, query or fragment: nothing to mask
    # Both kinds are found on the original text, then masked together: a '@' inside a query
    # value must not move where the query starts (http://h:1/?secret=@x).
    spans = _param_spans(text, depth)
    userinfo = _userinfo_mask(text, keep_user)
    if userinfo is not None:
        spans.append(userinfo)
    spans = [(a, b) for a, b in spans if b > a]
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for a, b in sorted(spans):
        if b <= pos:
            continue
        if a > pos or not out:
            out.append(text[pos:a])
            out.append(MASK)
        pos = b
    out.append(text[pos:])
    return "".join(out)


def mask_uri(text: str, *, keep_user: bool = False) -> str:
    """``text`` (a URI, or anything that may hold one) with its credentials replaced by ``***``.

    * **Userinfo.** The authority starts after the first ``//``; the userinfo ends at the last
      ``@`` before the first ``/``, ``?`` or ``#`` that follows (RFC 3986 §3.2, WHATWG URL),
      and, when the authority starts with ``user:``, at the last ``@`` before the first ``/``,
      ``?`` or ``#`` after the first ``@`` (how SQLAlchemy and people read a password holding
      ``/``, ``?`` or ``#``). In a database URL (``postgresql://``, ``sqlite://``, any
      ``dialect+driver://``) it ends at the last ``@`` of the text. The whole userinfo becomes
      ``***``; ``keep_user`` (database URLs) keeps the user name before the first ``:``. An empty
      userinfo (``https://@host``) stays empty.
    * **Parameters.** In the query and the fragment (after the first ``?`` or ``#`` past the
      userinfo), the value of every ``name=value`` whose name :func:`is_secret_param` (compared
      percent-decoded and case-insensitively; parameters split on ``&`` and ``;``) becomes
      ``***``, up to the next ``&`` (or the ``#`` that starts the fragment, except in a
      database URL). A value that is itself a URI carrying a secret (raw or
      percent-encoded) becomes ``***`` whole.

    Never raises. Over-masks rather than leaks: a URI with ``user:`` or ``host:port`` and an
    ``@`` later in its path loses everything up to that ``@``.
    """
    return _mask_uri(text, keep_user=keep_user, depth=0)


_URI_IN_TEXT = re.compile(r"[^\s'\"()<>]*(?://|[?#][^\s'\"()<>]*=)[^\s'\"()<>]*")


def mask_uris_in_text(text: str) -> str:
    """Free text (a finding's message) with :func:`mask_uri` applied to every word that holds
    ``//`` or a query or fragment parameter."""
    return _URI_IN_TEXT.sub(lambda m: mask_uri(m.group(0)), text)


def _as_url(url: URL | str) -> URL | None:
    # SQLAlchemy is imported here, not at the top: masking a redirect URI (check-redirect)
    # needs no database library.
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(url, URL):
        return url
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def mask_url(url: URL | str) -> str:
    """A database URL as text, through :func:`mask_uri` keeping the user name: the password
    (all of it, whatever it holds) and every secret-bearing query value become ``***``.

    A string that is not a parseable URL is not shown at all.
    """
    parsed = _as_url(url)
    if parsed is None:
        return WITHHELD
    raw = url if isinstance(url, str) else parsed.render_as_string(hide_password=False)
    return mask_uri(raw.strip(), keep_user=True)


def url_secrets(url: URL | str | None) -> tuple[str, ...]:
    """The secret values of a URL (password and secret query values), raw and URL-encoded."""
    if url is None:
        return ()
    parsed = _as_url(url)
    if parsed is None:
        return (str(url),) if isinstance(url, str) else ()
    found: list[str] = []
    if parsed.password:
        found.append(str(parsed.password))
    raw = url if isinstance(url, str) else parsed.render_as_string(hide_password=False)
    span = _userinfo_span(raw)
    if span is not None:
        # The whole password as mask_uri reads it, and what a parser put in the host name
        # (SQLAlchemy reads 'u:pa@ss@host' as password 'pa', host 'ss@host').
        password = raw[span[0] : span[1]].partition(":")[2]
        found.extend([password, unquote_plus(password)] if password else [])
        host = str(parsed.host or "")
        if "@" in host:
            found.append(host.rpartition("@")[0])
    for key, value in parsed.query.items():
        if is_secret_param(key):
            found.extend(value if isinstance(value, tuple) else (value,))
    out: set[str] = set()
    for s in found:
        if s:
            out.update({s, quote(s, safe=""), quote(s)})
    # Longest first, so that a secret containing another is removed whole.
    return tuple(sorted(out, key=len, reverse=True))


def _high_entropy(word: str) -> bool:
    """A long word mixing letters and digits: a token, hash, key or UUID rather than a name."""
    if len(word) < 16:
        return False
    letters = sum(c.isalpha() for c in word)
    digits = sum(c.isdigit() for c in word)
    return letters >= 2 and digits >= 2


def _keep_name(quoted: str, quote_char: str) -> str:
    inner = quoted[1:-1]
    if _NAME_LIKE.match(inner) and not _high_entropy(inner):
        return quoted
    return f"{quote_char}{WITHHELD}{quote_char}"


def _mask_quoted(text: str, keep: Iterable[str] = ()) -> str:
    """Replace quoted literals by a placeholder, keeping quoted names that are in ``keep``."""
    kept = set(keep)
    text = _SINGLE_QUOTED.sub(f"'{WITHHELD}'", text)
    return _DOUBLE_QUOTED.sub(lambda m: m.group(0) if m.group(1) in kept else f'"{WITHHELD}"', text)


def remove_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace every known secret value, and any inline ``password=...``, with ***."""
    for s in secrets:
        if s:
            text = text.replace(s, MASK)
    return _INLINE_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)


def scrub_text(text: str, secrets: Iterable[str] = (), limit: int = MAX_LENGTH) -> str:
    """Make free-form driver text safe to show: the rules for text with no structure.

    Used for SQLite messages, connection errors, and stored errors written by older versions.
    Idempotent, so text it already produced passes unchanged:

    * everything from ``DETAIL:``, ``HINT:``, ``CONTEXT:``, ``QUERY:``, ``STATEMENT:``,
      ``LINE n:``, ``[SQL:``, ``[parameters:`` or ``(Background on this error`` on is dropped;
    * parenthesized lists of four or more items (row images, value tuples) become
      ``(<redacted>)``;
    * quoted text is kept only when it looks like a name, host or number (no spaces, at most 63
      characters, not high-entropy), else it becomes ``"<redacted>"``;
    * long words mixing letters and digits (tokens, hashes, UUIDs) become ``<redacted>``;
    * known secrets (the URL's password and secret query values) and inline ``password=...``
      become ``***``; whitespace is collapsed and the text is cut to ``limit`` characters.
    """
    text = remove_secrets(text, secrets)
    cut = _CUT.search(text)
    if cut:
        text = text[: cut.start()]
    text = " ".join(text.split())
    text = _TUPLE.sub(f"({WITHHELD})", text)
    text = _SINGLE_QUOTED.sub(lambda m: _keep_name(m.group(0), "'"), text)
    text = _DOUBLE_QUOTED.sub(lambda m: _keep_name(m.group(0), '"'), text)
    text = _WORD.sub(lambda m: WITHHELD if _high_entropy(m.group(0)) else m.group(0), text)
    return remove_secrets(text, secrets)[:limit].strip(" ;.:")


def _diag_names(orig: BaseException) -> dict[str, str]:
    diag = getattr(orig, "diag", None)
    names: dict[str, str] = {}
    for label, attr in (
        ("constraint", "constraint_name"),
        ("table", "table_name"),
        ("column", "column_name"),
        ("schema", "schema_name"),
        ("type", "datatype_name"),
    ):
        value = getattr(diag, attr, None) if diag is not None else None
        if value and not (label == "schema" and value == "public"):
            names[label] = str(value)
    return names


def _postgres_message(orig: BaseException, sqlstate: str) -> str:
    diag = getattr(orig, "diag", None)
    primary = " ".join(str(getattr(diag, "message_primary", None) or "").split())
    context = str(getattr(diag, "context", None) or "")
    names = _diag_names(orig)
    function = _FUNCTION_CONTEXT.search(context)
    if function or sqlstate.startswith("P0"):
        # Raised in a trigger or function: its message is the author's text and can interpolate
        # NEW, so only the names the server reports are kept.
        where = f"function {function.group(1)}" if function else "a trigger or function"
        message = f"error raised in {where} (its message is withheld: it may contain row data)"
    elif sqlstate[:2] in _NAME_ONLY_CLASSES and sqlstate != "42601":
        message = primary
    else:
        message = _mask_quoted(primary, names.values())
    name = type(orig).__name__
    label = f"SQLSTATE {sqlstate}" + (f" {name}" if name not in ("Error", "DatabaseError") else "")
    extra = [f'{k} "{v}"' for k, v in names.items() if f'"{v}"' not in message]
    tail = f"; {', '.join(extra)}" if extra else ""
    return f"{message or 'error'} ({label}){tail}"


def describe_db_error(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """One safe line describing a driver (or SQLAlchemy) error.

    PostgreSQL errors with a SQLSTATE: the primary message, ``(SQLSTATE xxxxx ClassName)``, and
    the constraint/table/column/schema names the server reports. Never the ``DETAIL`` (row
    images, key values), ``HINT``, ``CONTEXT``, query text or parameters. The primary message
    is kept as is for SQLSTATE classes whose messages only name objects (integrity violations,
    lock and connection failures, privileges...); for others (data exceptions such as
    ``invalid input syntax for type uuid: "..."``, syntax errors) quoted literals are withheld.
    An error raised inside a trigger or function (a ``RAISE``, SQLSTATE class P0, or any error
    whose ``CONTEXT`` names a function) keeps only the function name and the reported object
    names, since its message can interpolate the row.

    SQLite errors and errors without a SQLSTATE (connection failures): the message through
    :func:`scrub_text`, with SQLite's extended result code name; a ``RAISE`` in a SQLite trigger
    (``SQLITE_CONSTRAINT_TRIGGER``) keeps only that code.

    The result always passes :func:`scrub_text`, so it is a fixed point of it.
    """
    secret_list = tuple(secrets)
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)
    errorname = getattr(orig, "sqlite_errorname", None)
    if isinstance(sqlstate, str) and sqlstate:
        message = _postgres_message(orig, sqlstate)
    elif isinstance(errorname, str):
        if errorname == "SQLITE_CONSTRAINT_TRIGGER":
            message = "a trigger aborted the statement (its message is withheld)"
        else:
            message = str(orig)
        message = f"{scrub_text(message, secret_list)} ({errorname})"
    else:
        message = str(orig)
    return scrub_text(message, secret_list) or type(orig).__name__


class _ScrubRecords(logging.Filter):
    """Rewrite a log record's text with :func:`scrub_text`; an attached exception (whose
    traceback would print the driver's full message) is reduced to :func:`describe_db_error`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{message}: {describe_db_error(record.exc_info[1])}"
        record.msg = scrub_text(message)
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def scrub_log_records() -> None:
    """Scrub every record the root logger's handlers (and logging's last-resort handler) emit:
    libraries such as psycopg and SQLAlchemy's pool log driver errors with their details."""
    handlers = [*logging.getLogger().handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, _ScrubRecords) for f in handler.filters):
            handler.addFilter(_ScrubRecords())
