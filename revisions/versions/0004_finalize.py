"""finalize: indexes, CHECK constraints and NOT NULL metadata (needs backfills)

Revision ID: 0004
Revises: 0003
"""

from sqlalchemy import String, Text
from sqlalchemy.engine import Connection

from oauthmig.columns import StringList
from oauthmig.rollout import finalize
from oauthmig.rollout.finalize import AddedColumn, Check, Finalize, IndexSpec, NotNull
from oauthmig.rollout.revisions import ColumnSpec, RevisionTarget

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

tables: tuple[str, ...] = ("application", "grant", "token")
requires_backfills: tuple[str, ...] = ("token-families", "client-metadata")
columns: tuple[ColumnSpec, ...] = ()

# Everything below is spelled out rather than imported from oauthmig.config or read from the
# other revisions: a revision must not change meaning when the code or the history around it
# evolves (RFC 7591 §2 and OpenID Connect Registration values).
AUTH_METHODS = (
    "none",
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
)

CHECKS = (
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
)
# The client-metadata backfill fills these; the types are the ones revision 0003 added.
NOT_NULLS = (
    NotNull("application", "token_endpoint_auth_method", String(40)),
    NotNull("application", "grant_types", StringList()),
    NotNull("application", "response_types", StringList()),
    NotNull("application", "application_type", String(8)),
)
INDEXES = (IndexSpec("token", "token_family_id"), IndexSpec("token", "parent_token_id"))
# The tables SQLite rebuilds here (those with CHECKs or NOT NULLs) as revisions 0001 and 0003
# left them, beyond the legacy columns: offline, the rebuild cannot reflect them.
ADDED = (
    AddedColumn("grant", "code_challenge", Text()),
    AddedColumn("grant", "code_challenge_method", String(10)),
    AddedColumn("grant", "redirect_uri", Text()),
    AddedColumn("application", "token_endpoint_auth_method", String(40)),
    AddedColumn("application", "grant_types", StringList()),
    AddedColumn("application", "response_types", StringList()),
    AddedColumn("application", "application_type", String(8)),
)

FINALIZE = Finalize(revision, down_revision, CHECKS, NOT_NULLS, INDEXES, ADDED)


def verify_applied(conn: Connection, target: RevisionTarget) -> list[str]:
    """What is missing for this revision's end state on ``target``'s database (for stamp)."""
    return finalize.verify(conn, target, FINALIZE)


def upgrade() -> None:
    finalize.upgrade(FINALIZE)


def downgrade() -> None:
    finalize.downgrade(FINALIZE)
