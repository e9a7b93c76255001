"""Client authentication at the token endpoint (RFC 6749 §2.3.1, §5.2; RFC 7591 §2).

:func:`authenticate_client` returns the application a token request authenticates as, or
raises :class:`~oauthmig.errors.InvalidClient`. :func:`parse_basic_credentials` reads an
``Authorization: Basic`` header the way RFC 6749 §2.3.1 encodes it (form-urlencoded id and
secret), and :func:`hash_client_secret` makes the hashed form a stored secret may take.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Final
from urllib.parse import unquote

from sqlalchemy import select
from sqlalchemy.orm import Session

from oauthmig.errors import InvalidClient, InvalidRequest
from oauthmig.provider.models import DEFAULT_MODELS, ApplicationModel, OAuthModels
from oauthmig.provider.observations import record_observation
from oauthmig.provider.policy import DEFAULT_POLICY, Check, EnforcementPolicy, Mode

__all__ = [
    "ACTIVE_STATUS",
    "AuthMethod",
    "authenticate_client",
    "hash_client_secret",
    "parse_basic_credentials",
    "registered_auth_method",
]


class AuthMethod(StrEnum):
    """The token endpoint authentication methods this module verifies (RFC 7591 §2)."""

    CLIENT_SECRET_BASIC = "client_secret_basic"
    CLIENT_SECRET_POST = "client_secret_post"
    NONE = "none"


#: ``application.status`` of an active application (Sentry's ``ApiApplicationStatus.active``).
ACTIVE_STATUS: Final = 0
#: Prefix of a hashed stored secret (Django's PBKDF2 format: ``pbkdf2_sha256$<iterations>$
#: <salt>$<base64 digest>``); any other stored value is the plain secret, as Sentry stores it.
_HASHED_PREFIX: Final = "pbkdf2_sha256$"
_DEFAULT_ITERATIONS: Final = 600_000
# One failure text for unknown client, wrong secret, inactive client: RFC 6749 §5.2 leaves
# the detail to the server, and telling them apart helps whoever guesses client ids.
_FAILED: Final = "client authentication failed"


def hash_client_secret(
    secret: str, *, iterations: int = _DEFAULT_ITERATIONS, salt: str | None = None
) -> str:
    """The hashed form of ``secret`` to store in ``client_secret`` (PBKDF2-SHA256)."""
    salt = salt or secrets.token_hex(12)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), iterations)
    return f"{_HASHED_PREFIX}{iterations}${salt}${base64.b64encode(digest).decode('ascii')}"


def _secret_matches(stored: str, presented: str) -> bool:
    """Constant-time comparison of a presented secret with the stored (plain or hashed) one."""
    if stored.startswith(_HASHED_PREFIX):
        try:
            _, iterations, salt, expected = stored.split("$", 3)
            digest = hashlib.pbkdf2_hmac(
                "sha256", presented.encode(), salt.encode(), int(iterations)
            )
        except ValueError:
            return False
        return hmac.compare_digest(base64.b64encode(digest).decode("ascii"), expected)
    return hmac.compare_digest(stored.encode(), presented.encode())


def registered_auth_method(application: ApplicationModel) -> str:
    """The client's ``token_endpoint_auth_method``; before the client-metadata backfill, the
    RFC 7591 §2 default the README documents: ``none`` without a secret, else
    ``client_secret_basic``."""
    return application.token_endpoint_auth_method or (
        AuthMethod.NONE.value if application.is_public else AuthMethod.CLIENT_SECRET_BASIC.value
    )


def parse_basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """``(client_id, client_secret)`` of an ``Authorization: Basic`` header, else None.

    RFC 6749 §2.3.1: both are form-urlencoded before base64; like authlib's server, only
    percent-escapes are decoded after (``+`` stays ``+``: clients that do not encode, such
    as authlib's own, send secrets with a literal ``+``). Raises InvalidClient for a Basic
    header that does not decode to ``id:secret``.
    """
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("the Authorization header is not valid Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("the Authorization header is not valid Basic credentials")
    return unquote(client_id), unquote(secret)


def authenticate_client(
    session: Session,
    *,
    client_id: str,
    client_secret: str | None = None,
    method: str,
    models: OAuthModels = DEFAULT_MODELS,
    policy: EnforcementPolicy = DEFAULT_POLICY,
    now: datetime | None = None,
) -> ApplicationModel:
    """The application ``client_id`` names, authenticated as a token request must be.

    ``method`` is how the request authenticated: ``client_secret_basic`` (the Authorization
    header, see :func:`parse_basic_credentials`), ``client_secret_post`` (form fields) or
    ``none`` (a ``client_id`` only). Raises InvalidClient when the client is unknown or not
    active, when a confidential client (one with a stored secret, plain as Sentry stores it
    or :func:`hash_client_secret`'s form) does not present the right secret (constant-time
    comparison), or when ``method`` is not the registered one (:func:`registered_auth_method`)
    and the policy's ``auth_method`` check is ``enforce``; a public client that presents a
    secret has used another method than ``none``, which is the same check. Under ``observe``
    that mismatch is recorded (in the session's transaction, not committed) and the client
    is accepted; under ``off`` it is accepted. A wrong or missing secret is never accepted.
    Reads only (and the observation); commits nothing.
    """
    try:
        used = AuthMethod(method)
    except ValueError:
        raise InvalidRequest(
            f"method must be one of {', '.join(m.value for m in AuthMethod)}"
        ) from None
    if not client_id:
        raise InvalidClient(_FAILED)
    if used is AuthMethod.NONE and client_secret:
        raise InvalidRequest("method none sends no client_secret")
    A = models.Application
    application = session.scalars(select(A).where(A.client_id == client_id)).one_or_none()
    if application is None or application.status != ACTIVE_STATUS:
        raise InvalidClient(_FAILED)
    stored = application.client_secret
    if stored:
        # A confidential client always proves its secret, whatever the policy says.
        if used is AuthMethod.NONE or not client_secret:
            raise InvalidClient(_FAILED)
        if not _secret_matches(stored, client_secret):
            raise InvalidClient(_FAILED)
    registered = registered_auth_method(application)
    if not stored and registered != AuthMethod.NONE.value:
        raise InvalidClient(_FAILED)  # registered as confidential, but there is no secret
    if used.value != registered:
        mode = policy.mode(Check.AUTH_METHOD, application.client_id)
        if mode is Mode.ENFORCE:
            raise InvalidClient(
                f"this client is registered for {registered} authentication, not {used.value}"
            )
        if mode is Mode.OBSERVE:
            record_observation(
                session,
                application_id=application.id,
                check=Check.AUTH_METHOD,
                now=now,
                bind_mapper=A,
            )
    return application
