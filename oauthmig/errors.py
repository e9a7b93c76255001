"""The exception tree of oauthmig.

Every error a user can cause or fix derives from :class:`OauthmigError`; the CLI turns it into
one line on stderr and exit code 2. Anything else escaping is a bug and may show a traceback.

    OauthmigError                      one-line message, exit 2
    ├── ConfigError                    bad config file, key or value (names the key)
    │   └── PoolerError                url is a transaction pooler; the command needs direct_url
    ├── UsageError                     arguments that do not fit together
    ├── OutputError                    an output file or stdout cannot be written (disk full)
    ├── PlanRefusedError               a database cannot be planned: nothing written anywhere
    ├── DatabaseError                  a database cannot be used as configured
    │   ├── UnreachableError           cannot connect
    │   ├── MissingTableError          a routed table does not exist
    │   ├── IncompatibleColumnError    existing column cannot be adopted
    │   ├── SchemaStateError           half-migrated or unknown revision in a version table
    │   ├── PrivilegeError             the role lacks privileges the command needs
    │   ├── LockBusyError              another oauthmig run holds this database's lock
    │   ├── LockTimeoutError           DDL could not get its lock within the retries
    │   ├── IndexTimeoutError          an index build or VALIDATE outlasted index_timeout
    │   ├── ConnectionLostError        the connection dropped in the middle of a step
    │   ├── RevisionFailedError        a revision failed for another reason
    │   └── ModelsSchemaError          live tables the models library could not write to
    ├── InstallationError              a file the package ships is missing (broken install)
    ├── GateError                      a revision waits for an unfinished backfill
    ├── BackfillError                  a backfill job failed (state saved)
    └── OAuthError                     token-endpoint errors of the models library
        ├── InvalidRequest             RFC 6749 §5.2 ``invalid_request``
        ├── InvalidClient              RFC 6749 §5.2 ``invalid_client`` (HTTP 401)
        ├── InvalidGrant               RFC 6749 §5.2 ``invalid_grant``
        ├── UnauthorizedClient         RFC 6749 §5.2 ``unauthorized_client``
        └── UnsupportedResponseType    RFC 6749 §4.1.2.1 ``unsupported_response_type``

    KeyboardInterrupt
    └── Terminated                     SIGTERM during a backfill: handled like Ctrl-C, exit 143
"""

from __future__ import annotations

from collections.abc import Sequence


class OauthmigError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(OauthmigError):
    """The configuration is invalid; the message names the offending key."""


class PoolerError(ConfigError):
    """A command that needs a session reached a transaction pooler (PgBouncer) and the
    database has no ``direct_url``; nothing was written."""


class UsageError(OauthmigError):
    """Command-line arguments that do not fit together."""


class OutputError(OauthmigError):
    """An output (a file option, or stdout) could not be written: disk full, I/O error."""


class PlanRefusedError(OauthmigError):
    """An upgrade or downgrade refused before writing to any database, because at least one
    of them cannot be planned; ``errors`` holds why, one error per such database."""

    def __init__(self, errors: Sequence[OauthmigError]) -> None:
        more = f" (and {len(errors) - 1} more above)" if len(errors) > 1 else ""
        super().__init__(
            f"{errors[0].message}{more}; nothing was changed on any database (fix it, or leave "
            "that database out with -d)"
        )
        self.errors = tuple(errors)

    def __reduce__(self) -> tuple[type[PlanRefusedError], tuple[tuple[OauthmigError, ...]]]:
        return (type(self), (self.errors,))


class DatabaseError(OauthmigError):
    """A database cannot be used as configured; the message names it."""


class UnreachableError(DatabaseError):
    """Connecting to a database failed."""


class MissingTableError(DatabaseError):
    """A table routed to a database does not exist there."""


class IncompatibleColumnError(DatabaseError):
    """A column already exists with a type oauthmig cannot adopt."""


class SchemaStateError(DatabaseError):
    """A version table names an unknown revision, or applied columns are missing."""


class PrivilegeError(DatabaseError):
    """The connected role lacks privileges the command needs; the message says what to grant."""


class LockBusyError(DatabaseError):
    """Another oauthmig run holds this database's migration or backfill lock."""


class LockTimeoutError(DatabaseError):
    """A DDL statement could not take its lock within ``lock_timeout`` after every retry."""


class IndexTimeoutError(DatabaseError):
    """An index build, index drop or VALIDATE did not finish within ``index_timeout``."""


class ConnectionLostError(DatabaseError):
    """The connection to a database was lost while a step was running."""


class RevisionFailedError(DatabaseError):
    """A revision failed on a database for a reason other than a lock timeout."""


class ModelsSchemaError(DatabaseError):
    """The live tables have required columns the models library has no value for."""


class InstallationError(OauthmigError):
    """A file that ships inside the package (revisions, rules reference) cannot be found."""


class GateError(OauthmigError):
    """A revision requires a backfill that is not finished on that database."""


class BackfillError(OauthmigError):
    """A backfill job failed; its state and last error are saved in the database."""


class OAuthError(OauthmigError):
    """An OAuth 2.0 token-endpoint error (RFC 6749 §5.2); ``error`` is the wire code and
    ``status`` the HTTP status to answer with."""

    error: str = "invalid_request"
    status: int = 400

    def response(self) -> dict[str, str]:
        """The RFC 6749 §5.2 JSON body: ``error`` and ``error_description``."""
        return {"error": self.error, "error_description": self.description}

    def __init__(self, description: str) -> None:
        super().__init__(f"{self.error}: {description}")
        self.description = description


class InvalidRequest(OAuthError):
    """The request is malformed (RFC 6749 §5.2 ``invalid_request``)."""

    error = "invalid_request"


class InvalidClient(OAuthError):
    """Client authentication failed (RFC 6749 §5.2 ``invalid_client``): unknown or inactive
    client, wrong secret, or not the registered authentication method. Answer 401 (with
    ``WWW-Authenticate: Basic`` when the client used the Authorization header)."""

    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    """The grant or refresh token is invalid, expired, revoked or mismatched."""

    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    """The client did not register this grant type (RFC 6749 §5.2 ``unauthorized_client``)."""

    error = "unauthorized_client"


class UnsupportedResponseType(OAuthError):
    """The client did not register this response type (RFC 6749 §4.1.2.1)."""

    error = "unsupported_response_type"


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. CI cancellation): unwinds like Ctrl-C, so state is saved; exit 143."""
