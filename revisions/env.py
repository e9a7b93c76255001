"""Alembic environment: oauthmig drives Alembic per routed database.

See :func:`oauthmig.rollout.revisions.run_environment`.
"""

from typing import cast

from alembic import context
from alembic.runtime.environment import EnvironmentContext

from oauthmig.rollout.revisions import run_environment

# alembic.context is a module that proxies every call to the EnvironmentContext running this
# script (typed as a module by Alembic's stub); run_environment takes it as that context.
run_environment(cast(EnvironmentContext, context))
