"""What kind of failure a driver error is: the one place that reads SQLSTATEs and SQLite's
busy errors to decide whether to retry, narrow a batch, reconnect or give up.

PostgreSQL SQLSTATEs (Appendix A of its manual): ``55P03`` lock_not_available (raised by
``lock_timeout``), ``40P01`` deadlock_detected, ``40001`` serialization_failure, ``57014``
query_canceled (``statement_timeout``, or a cancel request), class ``08`` connection
exceptions and ``57P01``-``57P03`` (admin shutdown, crash shutdown, cannot connect now).
SQLite's ``database is locked`` (SQLITE_BUSY after ``busy_timeout``) is a lock timeout.

A connection the server refuses for who or what it asks for (:func:`login_refused`: class
``28`` invalid authorization, ``3D000`` invalid catalog name) is a configuration error, not a
transient one: retrying the same URL cannot succeed.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy.exc import DBAPIError, PendingRollbackError

_LOST_CLASSES = ("08",)
_LOGIN_CODES = ("28", "3D000")
# libpq reports a refused connection before any result, so psycopg gives it no SQLSTATE: the
# server's FATAL message (in English unless lc_messages says otherwise) and libpq's own
# "no password supplied" are all there is.
_LOGIN_MESSAGES = (
    "authentication failed for user",  # password, scram, md5, peer, ident
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "does not exist",  # role "x" / database "x" does not exist
)
_LOST_CODES = ("57P01", "57P02", "57P03")


class FailureKind(StrEnum):
    """The closed set of driver-error kinds oauthmig acts on."""

    LOCK_TIMEOUT = "lock timeout"
    DEADLOCK = "deadlock"
    SERIALIZATION = "serialization"
    STATEMENT_TIMEOUT = "statement timeout"
    CONNECTION_LOST = "connection lost"
    OTHER = "other"

    @property
    def transient(self) -> bool:
        """Whether the same work may succeed when simply tried again (after a backoff)."""
        return self is not FailureKind.OTHER


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error (wrapped by SQLAlchemy or not), if it has one."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) and code else None


def classify(exc: BaseException) -> FailureKind:
    """The kind of failure ``exc`` is (see the module docstring); ``OTHER`` for anything that
    is not a recognised transient condition, including non-driver errors."""
    if isinstance(exc, PendingRollbackError):
        return FailureKind.CONNECTION_LOST  # SQLAlchemy's follow-up on an invalidated connection
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return FailureKind.CONNECTION_LOST
    code = sqlstate(exc) or ""
    if code.startswith(_LOST_CLASSES) or code in _LOST_CODES:
        return FailureKind.CONNECTION_LOST
    if code == "55P03":
        return FailureKind.LOCK_TIMEOUT
    if code == "40P01":
        return FailureKind.DEADLOCK
    if code == "40001":
        return FailureKind.SERIALIZATION
    if code == "57014":
        return FailureKind.STATEMENT_TIMEOUT
    if not code and "database is locked" in str(getattr(exc, "orig", None) or exc):
        return FailureKind.LOCK_TIMEOUT
    return FailureKind.OTHER


def login_refused(exc: BaseException) -> bool:
    """Whether a connection attempt failed because the server refused the login (bad user or
    password, no pg_hba.conf entry, a role that cannot log in) or the database does not exist,
    rather than because the server could not be reached in time."""
    code = sqlstate(exc)
    if code:
        return code.startswith(_LOGIN_CODES)
    message = str(getattr(exc, "orig", None) or exc)
    if "no password supplied" in message:
        return True
    _before, fatal, after = message.partition("FATAL:")
    return bool(fatal) and any(m in after for m in _LOGIN_MESSAGES)
