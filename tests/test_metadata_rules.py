"""The client metadata rules RU105-RU110 (pure; no database): each with cases that fire and
cases that stay quiet, URL masking, and their place in the shared rule registry."""

from __future__ import annotations

from typing import Any

import pytest

from oauthmig.redirects.metadata_rules import (
    METADATA_RULE_CODES,
    METADATA_URL_COLUMNS,
    check_metadata,
    display_url,
)
from oauthmig.redirects.rules import RULES

#: (urls, keyword arguments of check_metadata, code, whether it fires)
METADATA_CASES: list[Any] = []


def case(
    case_id: str,
    code: str,
    fires: bool,
    urls: dict[str, str | None],
    *,
    auth_method: str | None = "client_secret_basic",
    has_secret: bool = True,
) -> None:
    verb = "fires" if fires else "quiet"
    kwargs = {"auth_method": auth_method, "has_secret": has_secret}
    METADATA_CASES.append(pytest.param(urls, kwargs, code, fires, id=f"{code}-{verb}-{case_id}"))


case("no-scheme", "RU105", True, {"client_uri": "www.example.com"})
case("path-only", "RU105", True, {"logo_uri": "/static/logo.png"})
case("space-in-host", "RU105", True, {"jwks_uri": "https://keys example.com/jwks.json"})
case("https-no-host", "RU105", True, {"tos_uri": "https:///terms"})
case("bad-percent", "RU105", True, {"policy_uri": "https://a.example/%zz"})
case("absolute", "RU105", False, {"client_uri": "https://www.example.com/"})
case("blank-is-unset", "RU105", False, {"client_uri": "  ", "logo_uri": ""})

case("http", "RU106", True, {"jwks_uri": "http://app.example.com/jwks.json"})
case("javascript", "RU106", True, {"logo_uri": "javascript:alert(1)"})
case("data", "RU106", True, {"logo_uri": "data:image/png;base64,AAAA"})
case("upper-case-https", "RU106", False, {"client_uri": "HTTPS://app.example.com/"})
case("invalid-is-ru105-only", "RU106", False, {"client_uri": "http://a b.example/"})

case("user-password", "RU107", True, {"jwks_uri": "https://deploy:s3cret@app.example.com/j"})
case("empty-userinfo", "RU107", True, {"client_uri": "https://@app.example.com/"})
case("token-as-user", "RU107", True, {"logo_uri": "https://ghp_abc@cdn.example.com/l.png"})
case("at-in-path", "RU107", False, {"client_uri": "https://app.example.com/@team"})

case("fragment", "RU108", True, {"policy_uri": "https://app.example.com/legal#privacy"})
case("empty-fragment", "RU108", True, {"tos_uri": "https://app.example.com/terms#"})
case("query", "RU108", False, {"policy_uri": "https://app.example.com/legal?page=privacy"})

case("no-jwks", "RU109", True, {}, auth_method="private_key_jwt")
case("blank-jwks", "RU109", True, {"jwks_uri": " "}, auth_method="private_key_jwt")
case(
    "jwks-set",
    "RU109",
    False,
    {"jwks_uri": "https://app.example.com/jwks.json"},
    auth_method="private_key_jwt",
)
case("other-method", "RU109", False, {}, auth_method="client_secret_jwt")
case("unknown-method", "RU109", False, {}, auth_method=None)

case("none-with-secret", "RU110", True, {}, auth_method="none", has_secret=True)
case("none-public", "RU110", False, {}, auth_method="none", has_secret=False)
case("basic-with-secret", "RU110", False, {}, auth_method="client_secret_basic")


@pytest.mark.parametrize(("urls", "kwargs", "code", "fires"), METADATA_CASES)
def test_metadata_rule(
    urls: dict[str, str | None], kwargs: dict[str, Any], code: str, fires: bool
) -> None:
    codes = [f.code for f in check_metadata(urls, **kwargs)]
    assert (code in codes) is fires, codes


def test_codes_are_registered_after_the_redirect_rules() -> None:
    assert METADATA_RULE_CODES == ("RU105", "RU106", "RU107", "RU108", "RU109", "RU110")
    codes = list(RULES)
    first = codes.index("RU105")
    assert codes[first : first + 6] == list(METADATA_RULE_CODES)  # after RU101-RU104
    assert codes[:first][-4:] == ["RU101", "RU102", "RU103", "RU104"]
    assert list(RULES) == sorted(RULES)


def test_findings_name_the_rfc_field_and_the_column_it_is_stored_in() -> None:
    urls = {
        "client_uri": "http://app.example.com/",
        "policy_uri": "https://app.example.com/privacy#top",
        "tos_uri": "https://app.example.com/terms",
        "jwks_uri": "https://app.example.com/jwks.json",
        "logo_uri": "https://cdn.example.com/logo.png",
    }
    found = check_metadata(urls, auth_method="private_key_jwt", has_secret=False)
    assert [(f.field, f.column, f.code) for f in found] == [
        ("client_uri", "homepage_url", "RU106"),
        ("policy_uri", "privacy_url", "RU108"),
    ]
    assert found[0].uri == "http://app.example.com/" and found[0].normalized is not None
    assert dict(METADATA_URL_COLUMNS) == {
        "client_uri": "homepage_url",
        "policy_uri": "privacy_url",
        "tos_uri": "terms_url",
        "jwks_uri": "jwks_uri",
        "logo_uri": "logo_uri",
    }


def test_invalid_url_gets_only_ru105() -> None:
    found = check_metadata(
        {"logo_uri": "http://a b.example/#x"}, auth_method=None, has_secret=False
    )
    assert [f.code for f in found] == ["RU105"]
    assert found[0].normalized is None


def test_ru109_says_when_the_jwks_uri_column_is_missing() -> None:
    (with_column,) = check_metadata({}, auth_method="private_key_jwt", has_secret=False)
    (without,) = check_metadata(
        {}, auth_method="private_key_jwt", has_secret=False, jwks_uri_column=False
    )
    assert "revision 0006" not in with_column.message
    assert "revision 0006" in without.message


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("https://deploy:s3cret@app.example.com/j", "https://***@app.example.com/j"),
        ("https://ghp_abc@cdn.example.com/l.png", "https://***@cdn.example.com/l.png"),
        (
            "https://app.example.com/j?access_token=abc&v=2&api_key=k#f",
            "https://app.example.com/j?access_token=***&v=2&api_key=***#f",
        ),
        ("https://app.example.com/@team?page=1", "https://app.example.com/@team?page=1"),
        ("not a url", "not a url"),
    ],
)
def test_display_url_masks_credentials(raw: str, shown: str) -> None:
    assert display_url(raw) == shown


def test_credentials_never_reach_a_finding() -> None:
    found = check_metadata(
        {"jwks_uri": "http://deploy:s3cret@app.example.com/j?token=t0ps3cret#x"},
        auth_method=None,
        has_secret=False,
    )
    assert {f.code for f in found} == {"RU106", "RU107", "RU108"}
    for f in found:
        text = f"{f.uri} {f.normalized} {f.message}"
        assert "s3cret" not in text and "t0ps3cret" not in text and "deploy" not in text
