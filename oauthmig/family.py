"""The deterministic token family id of a token that has none (formula version 3).

A refreshable token written without a family (by the provider's legacy code, before or during
the rollout) gets the family ``family_id(table, id, database)``: a UUIDv8 (RFC 9562 §5.8) whose
high 64 bits are a constant of the table and database (:func:`family_high`: the first 8 bytes
of ``sha256("<database>:<table>")`` with version nibble 8) and whose low 64 bits are the variant
``10`` and the row id (``0x8000000000000000 | id``, ids below 2**60). Unique per (table,
database, id), and simple enough that both backends compute it in plain SQL inside a trigger
(:func:`family_sql`): the compatibility triggers, the token-families backfill and this function
always agree. Imports nothing from the rest of the package (the provider side uses it too).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Final

#: Ids at or above this would wrap into the variant bits (far beyond any real table).
ID_LIMIT: Final = 1 << 60
_ID_MASK: Final = ID_LIMIT - 1


def family_high(table_name: str, database: str) -> str:
    """The 16 hex digits of the high half of every family id of ``table_name`` on ``database``."""
    digest = int.from_bytes(hashlib.sha256(f"{database}:{table_name}".encode()).digest()[:8])
    return f"{(digest & ~0xF000) | 0x8000:016x}"


def family_id(table_name: str, row_id: int, database: str) -> uuid.UUID:
    """The family id of token ``row_id`` of ``table_name`` on the configured ``database``."""
    return uuid.UUID(f"{family_high(table_name, database)}8{int(row_id) & _ID_MASK:015x}")


def family_sql(dialect: str, high: str, id_sql: str) -> str:
    """SQL computing :func:`family_id` from the row id expression ``id_sql``, as the column
    stores it: a ``uuid`` on PostgreSQL, 32 hex digits (SQLAlchemy's ``Uuid`` form) on SQLite."""
    if dialect == "postgresql":
        return f"CAST('{high}8' || lpad(to_hex({id_sql} & {_ID_MASK}), 15, '0') AS uuid)"
    return f"('{high}8' || printf('%015x', {id_sql} & {_ID_MASK}))"
