"""Every use of Ray Tune's private or internal API in raylane_tune, and nowhere else.

Ray Tune has no public "is this process running a trial?" call, and says the head-bundle flag of a
``PlacementGroupFactory`` is internal. ``tests/test_ray_tune_contract.py`` checks each name used here against the
installed Ray, so a release that changes one fails that test by name instead of misplacing workers.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.tune import PlacementGroupFactory

# Imported by ``ray.tune`` itself, so a process without it has no Tune session. Checking ``sys.modules`` first keeps
# the hooks free in processes that never imported Tune (every raylane worker).
_SESSION_MODULE = "ray.tune.trainable.trainable_fn_utils"


def in_tune_trial() -> bool:
    """True in a process that runs a Ray Tune function trainable (a trial's driver), False anywhere else.

    A Ray Train worker also has a session but is not a Tune trial; Tune's own check tells them apart.
    """
    module = sys.modules.get(_SESSION_MODULE)
    return module is not None and bool(module._in_tune_session())


def head_bundle_is_empty(resources: PlacementGroupFactory) -> bool:
    """True when the trial's first bundle asked for nothing: Tune then drops it, and the trial's own process runs
    with no reservation inside the first remaining bundle."""
    return bool(resources.head_bundle_is_empty)
