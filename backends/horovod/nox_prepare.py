"""Run by the noxfile's ``backend`` session after installing this package: build (or reuse) Horovod and install it.

The first run on a machine compiles Horovod (a few minutes); later runs reuse the cached wheel
(``~/.cache/raylane/wheels``), so the session stays fast.
"""

import sys

from raylane_horovod.build_horovod import main

if __name__ == "__main__":
    sys.exit(main(["--install"]))
