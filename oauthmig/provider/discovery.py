"""The authorization server metadata document (RFC 8414 §2), served at
``/.well-known/oauth-authorization-server``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oauthmig.config import ClientMetadataDefaults
from oauthmig.provider.clients import AuthMethod
from oauthmig.provider.policy import DEFAULT_POLICY, Check, EnforcementPolicy, Mode

__all__ = ["IMPLEMENTED_GRANT_TYPES", "authorization_server_metadata"]

#: The grant types the models implement (RFC 6749 §4.1 and §6).
IMPLEMENTED_GRANT_TYPES: tuple[str, ...] = ("authorization_code", "refresh_token")


def authorization_server_metadata(
    issuer: str,
    *,
    authorization_endpoint: str,
    token_endpoint: str,
    client_metadata: ClientMetadataDefaults | None = None,
    policy: EnforcementPolicy = DEFAULT_POLICY,
    allow_plain: bool = False,
    scopes_supported: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The RFC 8414 §2 metadata of this server.

    The endpoints are the caller's (``extra`` adds others: ``revocation_endpoint``,
    ``registration_endpoint``, ``jwks_uri``, ...). From the configuration
    (``[backfill.client_metadata]``, ``Settings.backfill.client_metadata``) and the policy:
    ``grant_types_supported`` (the configured grant types the models implement),
    ``response_types_supported`` (``code`` when configured),
    ``token_endpoint_auth_methods_supported`` (``none`` and the configured confidential
    method while the ``auth_method`` check is enforced everywhere; every method
    :func:`~oauthmig.provider.clients.authenticate_client` accepts otherwise) and
    ``code_challenge_methods_supported`` (``S256``, and ``plain`` with ``allow_plain``,
    RFC 7636 §4.3). ``issuer`` must be the https URL the document is served under
    (RFC 8414 §2, §3.3).
    """
    defaults = client_metadata or ClientMetadataDefaults()
    grant_types = [g for g in defaults.grant_types if g in IMPLEMENTED_GRANT_TYPES]
    response_types = [r for r in defaults.response_types if r == "code"]
    if policy.modes_in_use(Check.AUTH_METHOD) == {Mode.ENFORCE}:
        methods = [AuthMethod.NONE.value]
        if defaults.confidential_auth_method in (m.value for m in AuthMethod):
            methods.insert(0, defaults.confidential_auth_method)
    else:
        methods = [m.value for m in AuthMethod]
    body: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": authorization_endpoint,
        "token_endpoint": token_endpoint,
        "response_types_supported": response_types or ["code"],
        "grant_types_supported": grant_types or ["authorization_code"],
        "token_endpoint_auth_methods_supported": methods,
        "code_challenge_methods_supported": ["S256", "plain"] if allow_plain else ["S256"],
    }
    if scopes_supported:
        body["scopes_supported"] = list(scopes_supported)
    for key, value in (extra or {}).items():
        body.setdefault(key, value)
    return body
