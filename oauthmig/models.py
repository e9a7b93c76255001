"""The documented import path of the provider models: ``from oauthmig.models import ...``.

The code lives in :mod:`oauthmig.provider.models`; this module re-exports its public API.
"""

from oauthmig.provider.models import *  # noqa: F403
from oauthmig.provider.models import __all__ as __all__
