"""Build (or reuse) a Horovod wheel patched for torch >= 2.1; ``--install`` puts it into this interpreter.

A path-runnable front for :mod:`raylane_horovod.build_horovod` (the same code, shipped inside the package so an
installed raylane-horovod can run ``python -m raylane_horovod.build_horovod``). Running it by path needs only the
standard library and torch, not raylane itself::

    python backends/horovod/build_horovod.py --install
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).parent / "src" / "raylane_horovod" / "build_horovod.py"), run_name="__main__")
