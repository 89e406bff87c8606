"""What raylane can tell about the program this interpreter runs, to decide whether it may start Ray on its own.

A training script run as ``python train.py`` that leaves Ray to raylane is the case worth a head start. Everything else
(a notebook, a REPL, ``python -c``, an installed command or tool, one of Ray's own processes, one rank of another
launcher, a script that uses Ray itself) is told apart here, by reading ``__main__`` and the script's own file.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from pathlib import Path

import ray

# `import ray`, `import os, ray`, `from ray import tune`, `ray.init(...)`: a script that uses Ray itself may call
# ray.init, or make Ray start through one of its libraries, at any line; a Ray started under it before that would
# change what it gets.
_USES_RAY = re.compile(
    r"^\s*(import\s+(?:[\w.]+(?:\s+as\s+\w+)?\s*,\s*)*ray\b|from\s+ray\b)|\bray\.init\b", re.MULTILINE
)
# Set in each process of torchrun, Lightning's own ddp launcher, MPI and Horovod: one rank of a job something else
# launched, which must not start a Ray per rank.
_RANK_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def path() -> Path | None:
    """The file ``__main__`` runs, or None (a notebook, a REPL, ``python -c``)."""
    file = getattr(sys.modules.get("__main__"), "__file__", None)
    return Path(file).resolve() if file else None


def text() -> str:
    """The script's source, or "" when there is none to read."""
    script = path()
    if script is None:
        return ""
    try:
        return script.read_text(errors="replace")
    except OSError:
        return ""


def calls_ray_init() -> bool:
    """Whether the script mentions ``ray.init``: it then picks its own Ray, maybe after building the Trainer."""
    return "ray.init" in text()


def why_not_a_training_script() -> str | None:
    """Why this interpreter is not a user's training script that leaves Ray to raylane, or None when it is one."""
    script = path()
    if script is None or hasattr(sys, "ps1") or sys.flags.interactive:
        # Also multiprocessing's spawn and forkserver children: they run `python -c`, and import the parent's script
        # (as "__mp_main__") before multiprocessing.parent_process() is set.
        return "not a script (a notebook, a REPL, python -c, or a multiprocessing child)"
    if rank := next((name for name in _RANK_VARIABLES if name in os.environ), None):
        return f"one rank of a job another launcher started ({rank} is set)"
    if any(_inside(script, folder) for folder in _installed_code()):
        return "an installed command or tool, or one of Ray's own processes, not a training script"
    if _USES_RAY.search(text()):
        return "the script imports Ray itself, so it picks when and how Ray starts"
    return None


def _installed_code() -> list[Path]:
    """Where installed programs live: console scripts, site-packages, the standard library, Ray and raylane."""
    folders = {sysconfig.get_path(name) for name in ("scripts", "purelib", "platlib", "stdlib")}
    packages = [Path(ray.__file__).parent, Path(__file__).parent]
    return [*(Path(folder).resolve() for folder in folders if folder), *packages]


def _inside(file: Path, folder: Path) -> bool:
    return file.is_relative_to(folder.resolve())
