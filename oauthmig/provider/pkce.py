"""PKCE (RFC 7636) as pure functions: challenge checks at authorization, verifier at exchange.

Nothing here touches a database; :mod:`oauthmig.provider.models` applies these rules to grant rows.

* :func:`parse_code_challenge` checks ``code_challenge`` / ``code_challenge_method`` of an
  authorization request. ``S256`` only by default; ``plain`` (and a challenge without a method,
  which RFC 7636 §4.3 defines as ``plain``) only when ``allow_plain`` is set.
* :func:`verify_code_verifier` checks a token request's ``code_verifier`` against what the grant
  stored, including the RFC 9700 §2.1.1 downgrade rule: a verifier presented for a grant that
  stored no challenge is rejected.

Errors are :class:`~oauthmig.errors.InvalidRequest` for a missing or malformed parameter and
:class:`~oauthmig.errors.InvalidGrant` when the parameter is well formed but does not match the
grant (RFC 7636 §4.6). ``None`` means "parameter absent"; an empty string is a present but
malformed value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

from oauthmig.errors import InvalidGrant, InvalidRequest

__all__ = [
    "PLAIN",
    "S256",
    "ChallengeMethod",
    "CodeChallenge",
    "check_code_verifier",
    "parse_code_challenge",
    "s256_challenge",
    "verify_code_verifier",
]

S256: Literal["S256"] = "S256"
PLAIN: Literal["plain"] = "plain"
ChallengeMethod = Literal["S256", "plain"]

# RFC 7636 §4.1 / §4.2: code-verifier = code-challenge = 43*128unreserved,
# unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~" (ASCII only).
_UNRESERVED_43_128 = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
# An S256 challenge is BASE64URL(SHA256(...)) without padding: always 43 base64url characters.
_S256_FORM = re.compile(r"[A-Za-z0-9_\-]{43}")


@dataclass(frozen=True, slots=True)
class CodeChallenge:
    """A validated challenge as a grant stores it."""

    challenge: str
    method: ChallengeMethod


def s256_challenge(code_verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(code_verifier)))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(code_verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_code_verifier(code_verifier: str) -> None:
    """Raise InvalidRequest unless the verifier is 43-128 unreserved characters (RFC 7636 §4.1)."""
    if not _UNRESERVED_43_128.fullmatch(code_verifier):
        raise InvalidRequest(
            "code_verifier must be 43 to 128 characters from A-Z a-z 0-9 - . _ ~ "
            f"(RFC 7636 §4.1); got {len(code_verifier)} characters"
        )


def parse_code_challenge(
    code_challenge: str | None,
    code_challenge_method: str | None,
    *,
    allow_plain: bool = False,
    require: bool = False,
) -> CodeChallenge | None:
    """Validate an authorization request's PKCE parameters; ``None`` when PKCE is not used.

    ``require`` rejects a request without a challenge (RFC 7636 §4.4.1, RFC 9700 §2.1.1 for
    public clients). Unsupported methods are ``invalid_request`` (RFC 7636 §4.4.1). Under
    S256-only a challenge without a method is rejected rather than silently treated as plain.
    """
    if code_challenge is None:
        if code_challenge_method is not None:
            raise InvalidRequest("code_challenge_method given without code_challenge")
        if require:
            raise InvalidRequest("code_challenge is required (RFC 7636 §4.4.1)")
        return None
    if code_challenge_method is None:
        # RFC 7636 §4.3: an absent method means "plain".
        if not allow_plain:
            raise InvalidRequest(
                "code_challenge_method is required and must be S256 (plain is not allowed)"
            )
        code_challenge_method = PLAIN
    if code_challenge_method == S256:
        if not _S256_FORM.fullmatch(code_challenge):
            raise InvalidRequest(
                "an S256 code_challenge is 43 base64url characters without padding (RFC 7636 §4.2)"
            )
        return CodeChallenge(code_challenge, S256)
    if code_challenge_method == PLAIN:
        if not allow_plain:
            raise InvalidRequest("code_challenge_method plain is not allowed; use S256")
        if not _UNRESERVED_43_128.fullmatch(code_challenge):
            raise InvalidRequest(
                "code_challenge must be 43 to 128 characters from A-Z a-z 0-9 - . _ ~ "
                "(RFC 7636 §4.2)"
            )
        return CodeChallenge(code_challenge, PLAIN)
    raise InvalidRequest(
        f"code_challenge_method {code_challenge_method[:20]!r} is not supported; use S256"
    )


def verify_code_verifier(
    code_challenge: str | None,
    code_challenge_method: str | None,
    code_verifier: str | None,
    *,
    allow_plain: bool = False,
) -> None:
    """Check a token request's ``code_verifier`` against a grant's stored challenge.

    Returns when the exchange may proceed: either both are absent (a grant made without PKCE)
    or the verifier matches. The comparison is constant-time (``hmac.compare_digest``).
    A stored ``plain`` challenge is honoured only while ``allow_plain`` is set, and so is a
    stored challenge whose method is NULL, which RFC 7636 §4.3 defines as ``plain``.
    """
    if code_challenge is None:
        if code_verifier is not None:
            # RFC 9700 §2.1.1: a code_verifier for a grant made without a code_challenge
            # means the challenge was stripped from the authorization request (downgrade).
            raise InvalidGrant(
                "code_verifier given but the authorization request had no code_challenge"
            )
        return
    if code_verifier is None:
        raise InvalidRequest("code_verifier is required for this authorization code")
    check_code_verifier(code_verifier)
    if code_challenge_method is None:
        # RFC 7636 §4.3: a challenge without a method is "plain". Rows get one from a
        # provider's own migration of the column, never from store_challenge.
        if not allow_plain:
            raise InvalidGrant(
                "the code was issued with a code_challenge but no code_challenge_method, which "
                "RFC 7636 §4.3 defines as plain; plain is not allowed (S256 only)"
            )
        code_challenge_method = PLAIN
    if code_challenge_method == S256:
        expected = s256_challenge(code_verifier)
    elif code_challenge_method == PLAIN and allow_plain:
        expected = code_verifier
    elif code_challenge_method == PLAIN:
        raise InvalidGrant(
            "the code was issued with code_challenge_method plain, which is no longer allowed"
        )
    else:
        raise InvalidGrant("the code has an unsupported code_challenge_method")
    if not hmac.compare_digest(expected.encode("ascii"), code_challenge.encode("utf-8")):
        raise InvalidGrant("code_verifier does not match the code_challenge")
