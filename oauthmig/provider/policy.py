"""The enforcement policy: a mode per check, globally and per client (README, "Adopting the
models", enforcement).

Each :class:`Check` runs in one :class:`Mode`:

* ``off``: not checked (``refresh_reuse``: a stale refresh token is still refused, nothing is
  revoked and nothing recorded);
* ``observe``: the call behaves as without the check (``refresh_reuse``: the stale token is
  refused, the family stays alive) and records the would-be rejection, aggregated per
  application, check and day (:mod:`oauthmig.provider.observations`);
* ``enforce``: the check rejects (``refresh_reuse``: the whole family is revoked).

The rollout order is observe, read "Enforcement readiness" (``oauthmig status``,
``oauthmig report --html``), then enforce once its list is empty or holds only clients that
are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from oauthmig.config import (
    ENFORCEMENT_CHECKS,
    ENFORCEMENT_DEFAULTS,
    ENFORCEMENT_MODES,
    EnforcementSettings,
)

__all__ = ["DEFAULT_POLICY", "Check", "EnforcementPolicy", "Mode"]


class Mode(StrEnum):
    """How a check runs."""

    OFF = "off"
    OBSERVE = "observe"
    ENFORCE = "enforce"


class Check(StrEnum):
    """What the token and authorization endpoints can enforce."""

    #: Authorization requests without a PKCE challenge (RFC 7636, RFC 9700 §2.1.1).
    PKCE_REQUIRED = "pkce_required"
    #: A grant or response type the client did not register (RFC 7591 §2).
    GRANT_TYPES = "grant_types"
    #: Client authentication by a method other than the registered one (RFC 7591 §2).
    AUTH_METHOD = "auth_method"
    #: A rotated refresh token presented again (RFC 9700 §4.14.2).
    REFRESH_REUSE = "refresh_reuse"


assert tuple(Check) == ENFORCEMENT_CHECKS and tuple(Mode) == ENFORCEMENT_MODES

#: Modes when nothing is configured (:data:`oauthmig.config.ENFORCEMENT_DEFAULTS`): what the
#: library did before the policy existed (PKCE optional, refresh reuse revokes the family), and
#: the registered metadata enforced.
_DEFAULT_MODES: Mapping[Check, Mode] = MappingProxyType(
    {Check(k): Mode(v) for k, v in ENFORCEMENT_DEFAULTS.items()}
)


@dataclass(frozen=True, slots=True)
class EnforcementPolicy:
    """A mode per check (``modes``, missing checks take the defaults: ``pkce_required`` off,
    the others enforce), and per-client overrides (``clients``: ``client_id`` -> check ->
    mode), which win over ``modes`` for that client."""

    modes: Mapping[Check, Mode] = field(default_factory=dict)
    clients: Mapping[str, Mapping[Check, Mode]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept plain strings ("observe") and freeze the mappings.
        modes = {Check(k): Mode(v) for k, v in self.modes.items()}
        clients = {
            str(cid): MappingProxyType({Check(k): Mode(v) for k, v in over.items()})
            for cid, over in self.clients.items()
        }
        object.__setattr__(self, "modes", MappingProxyType(modes))
        object.__setattr__(self, "clients", MappingProxyType(clients))

    @classmethod
    def from_settings(cls, settings: EnforcementSettings) -> EnforcementPolicy:
        """The policy of the ``[enforcement]`` configuration section."""
        return cls(
            {Check(k): Mode(v) for k, v in settings.modes.items()},
            {
                cid: {Check(k): Mode(v) for k, v in over.items()}
                for cid, over in settings.clients.items()
            },
        )

    def mode(self, check: Check | str, client_id: str | None = None) -> Mode:
        """The mode of ``check`` for ``client_id`` (its override, else the global mode)."""
        chosen = Check(check)
        if client_id is not None:
            over = self.clients.get(client_id)
            if over is not None and chosen in over:
                return over[chosen]
        return self.modes.get(chosen, _DEFAULT_MODES[chosen])

    def modes_in_use(self, check: Check | str) -> frozenset[Mode]:
        """Every mode ``check`` runs in, globally or for some client."""
        chosen = Check(check)
        found = {self.mode(chosen)}
        found.update(over[chosen] for over in self.clients.values() if chosen in over)
        return frozenset(found)


#: The policy used when none is passed: see :class:`EnforcementPolicy`.
DEFAULT_POLICY = EnforcementPolicy()
