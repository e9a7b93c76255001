"""PKCE rules as pure functions (RFC 7636, RFC 9700 §2.1.1); the database side is in
test_models.py, which runs the same rules through grants on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from oauthmig.errors import InvalidGrant, InvalidRequest, OAuthError
from oauthmig.provider.pkce import (
    CodeChallenge,
    check_code_verifier,
    parse_code_challenge,
    s256_challenge,
    verify_code_verifier,
)

# RFC 7636 Appendix B.
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_rfc7636_appendix_b() -> None:
    assert s256_challenge(VERIFIER) == CHALLENGE
    verify_code_verifier(CHALLENGE, "S256", VERIFIER)


@pytest.mark.parametrize(
    "length, ok",
    [(42, False), (43, True), (128, True), (129, False)],
    ids=["42-rejected", "43-accepted", "128-accepted", "129-rejected"],
)
def test_verifier_length(length: int, ok: bool) -> None:
    verifier = ("aZ0-._~" * 20)[:length]
    if ok:
        check_code_verifier(verifier)
        verify_code_verifier(s256_challenge(verifier), "S256", verifier)
    else:
        with pytest.raises(InvalidRequest):
            verify_code_verifier(s256_challenge(verifier), "S256", verifier)


@pytest.mark.parametrize(
    "bad",
    [" ", "+", "/", "=", "%", "é", "\n"],
    ids=["space", "plus", "slash", "equals", "percent", "non-ascii", "newline"],
)
def test_verifier_characters_outside_unreserved(bad: str) -> None:
    verifier = VERIFIER[:-1] + bad
    with pytest.raises(InvalidRequest) as info:
        check_code_verifier(verifier)
    assert info.value.error == "invalid_request"


def test_wrong_verifier_is_invalid_grant() -> None:
    with pytest.raises(InvalidGrant) as info:
        verify_code_verifier(CHALLENGE, "S256", "x" * 43)
    assert info.value.error == "invalid_grant"


@pytest.mark.parametrize(
    "challenge, method, allow_plain, expected",
    [
        (CHALLENGE, "S256", False, CodeChallenge(CHALLENGE, "S256")),
        (None, None, False, None),
        (VERIFIER, "plain", True, CodeChallenge(VERIFIER, "plain")),
        (VERIFIER, None, True, CodeChallenge(VERIFIER, "plain")),
        (CHALLENGE, None, False, InvalidRequest),
        (VERIFIER, "plain", False, InvalidRequest),
        (CHALLENGE, "s256", False, InvalidRequest),
        (CHALLENGE, "SHA256", True, InvalidRequest),
        (None, "S256", False, InvalidRequest),
        (CHALLENGE + "=", "S256", False, InvalidRequest),
        (CHALLENGE[:-1], "S256", False, InvalidRequest),
        ("", "S256", False, InvalidRequest),
        ("a" * 42, "plain", True, InvalidRequest),
    ],
    ids=[
        "s256",
        "no-pkce",
        "plain-allowed",
        "no-method-plain-allowed",
        "no-method-s256-only",
        "plain-disallowed",
        "lowercase-s256",
        "unknown-method",
        "method-without-challenge",
        "padded-s256",
        "short-s256",
        "empty-challenge",
        "short-plain",
    ],
)
def test_parse_code_challenge(
    challenge: str | None,
    method: str | None,
    allow_plain: bool,
    expected: CodeChallenge | type[OAuthError] | None,
) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse_code_challenge(challenge, method, allow_plain=allow_plain)
    else:
        assert parse_code_challenge(challenge, method, allow_plain=allow_plain) == expected


def test_required_pkce_rejects_missing_challenge() -> None:
    with pytest.raises(InvalidRequest):
        parse_code_challenge(None, None, require=True)


def test_downgrade_and_missing_verifier() -> None:
    with pytest.raises(InvalidGrant):  # RFC 9700 §2.1.1
        verify_code_verifier(None, None, VERIFIER)
    verify_code_verifier(None, None, None)  # a grant made without PKCE
    with pytest.raises(InvalidRequest):
        verify_code_verifier(CHALLENGE, "S256", None)


def test_plain_stored_but_no_longer_allowed() -> None:
    verify_code_verifier(VERIFIER, "plain", VERIFIER, allow_plain=True)
    with pytest.raises(InvalidGrant):
        verify_code_verifier(VERIFIER, "plain", VERIFIER, allow_plain=False)


def test_stored_challenge_without_method_is_plain() -> None:
    # RFC 7636 §4.3: "If no code_challenge_method is present, ... 'plain'".
    verify_code_verifier(VERIFIER, None, VERIFIER, allow_plain=True)
    with pytest.raises(InvalidGrant, match="does not match"):
        verify_code_verifier(VERIFIER, None, VERIFIER[:-1] + "A", allow_plain=True)
    with pytest.raises(InvalidGrant, match=r"no code_challenge_method.*§4\.3.*S256 only"):
        verify_code_verifier(VERIFIER, None, VERIFIER, allow_plain=False)
    # An S256 challenge stored without its method is compared as plain: it cannot match.
    with pytest.raises(InvalidGrant, match="does not match"):
        verify_code_verifier(s256_challenge(VERIFIER), None, VERIFIER, allow_plain=True)
