"""The documented import path of the provider models: ``from oauthmig.models import ...``.

The code lives in :mod:`oauthmig.provider.models` (models, token endpoint),
:mod:`oauthmig.provider.clients` (client authentication), :mod:`oauthmig.provider.policy`
(the enforcement policy) and :mod:`oauthmig.provider.discovery` (RFC 8414 metadata); this
module re-exports their public API.
"""

from oauthmig.provider.clients import (
    AuthMethod,
    authenticate_client,
    hash_client_secret,
    parse_basic_credentials,
    registered_auth_method,
)
from oauthmig.provider.discovery import authorization_server_metadata
from oauthmig.provider.models import *  # noqa: F403
from oauthmig.provider.models import __all__ as _models_all
from oauthmig.provider.policy import DEFAULT_POLICY, Check, EnforcementPolicy, Mode

__all__ = [
    *_models_all,
    "DEFAULT_POLICY",
    "AuthMethod",
    "Check",
    "EnforcementPolicy",
    "Mode",
    "authenticate_client",
    "authorization_server_metadata",
    "hash_client_secret",
    "parse_basic_credentials",
    "registered_auth_method",
]
