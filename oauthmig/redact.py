"""Keep secrets out of everything oauthmig prints, logs, writes or stores.

Two kinds of text can carry a secret:

* **Database URLs.** :func:`mask_url` replaces the userinfo password and the value of every
  query parameter that can carry a secret or a key (``password``, ``sslpassword``, ``passfile``,
  ``sslkey``, and any parameter whose name mentions a password, secret, token, key or
  credential) with ``***``. :func:`url_secrets` lists those values, so that they can also be
  removed from text that merely echoes them.
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
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

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


def is_secret_param(name: str) -> bool:
    """True for a URL query parameter whose value may be a secret, a key or a path to one."""
    return name.lower() in SECRET_PARAMS or bool(_SECRET_PARAM_WORDS.search(name))


def _as_url(url: URL | str) -> URL | None:
    if isinstance(url, URL):
        return url
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def mask_url(url: URL | str) -> str:
    """The URL as text with its password and every secret-bearing query value replaced by ***.

    A string that is not a parseable URL is not shown at all.
    """
    parsed = _as_url(url)
    if parsed is None:
        return WITHHELD
    base = parsed.set(query={}).render_as_string(hide_password=True)
    pairs: list[str] = []
    for key, value in parsed.query.items():
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            shown = MASK if is_secret_param(key) else quote(str(v), safe="")
            pairs.append(f"{quote(key, safe='')}={shown}")
    return f"{base}?{'&'.join(pairs)}" if pairs else base


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
