"""Alembic environment: oauthmig drives Alembic per routed database (see oauthmig.migrations)."""

from alembic import context

from oauthmig.rollout.revisions import run_environment

run_environment(context)
