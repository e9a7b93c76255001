"""finalize: indexes, CHECK constraints and NOT NULL metadata (needs backfills)

Revision ID: 0004
Revises: 0003
"""

from sqlalchemy.engine import Connection

from oauthmig.rollout import finalize
from oauthmig.rollout.finalize import Check, IndexSpec, NotNull
from oauthmig.rollout.revisions import ColumnSpec, RevisionTarget, history

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

tables: tuple[str, ...] = ("application", "grant", "token")
requires_backfills: tuple[str, ...] = ("token-families", "client-metadata")
columns: tuple[ColumnSpec, ...] = ()

# Spelled out rather than imported from oauthmig.config: a revision must not change meaning when
# the code around it evolves (RFC 7591 §2 and OpenID Connect Registration values).
AUTH_METHODS = (
    "none",
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
)

CHECKS = [
    Check("grant", "code_challenge_method_check", "code_challenge_method IN ('S256', 'plain')"),
    Check(
        "grant",
        "code_challenge_pair_check",
        "(code_challenge IS NULL) = (code_challenge_method IS NULL)",
    ),
    Check(
        "application",
        "token_endpoint_auth_method_check",
        "token_endpoint_auth_method IN (" + ", ".join(f"'{m}'" for m in AUTH_METHODS) + ")",
    ),
    Check("application", "application_type_check", "application_type IN ('web', 'native')"),
]
INDEXES = [IndexSpec("token", "token_family_id"), IndexSpec("token", "parent_token_id")]


def _not_nulls() -> list[NotNull]:
    specs = {c.name: c for rev in history() for c in rev.columns if c.table == "application"}
    return [
        NotNull("application", name, specs[name])
        for name in (
            "token_endpoint_auth_method",
            "grant_types",
            "response_types",
            "application_type",
        )
    ]


def verify_applied(conn: Connection, target: RevisionTarget) -> list[str]:
    """What is missing for this revision's end state on ``target``'s database (for stamp)."""
    return finalize.verify(conn, target, revision, CHECKS, _not_nulls(), INDEXES)


def upgrade() -> None:
    finalize.upgrade(revision, CHECKS, _not_nulls(), INDEXES)


def downgrade() -> None:
    finalize.downgrade(revision, CHECKS, _not_nulls(), INDEXES)
