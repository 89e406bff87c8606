"""Run by the noxfile's ``backend`` session after installing this package: compile DeepSpeed's CPU communication op.

DeepSpeed compiles its shared-memory communication op the first time a CPU process joins a group (about a minute,
cached under ``~/.cache/torch_extensions``). Doing it here keeps that minute out of the first test's time limit.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what the backend sets on CPU workers
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        sys.exit(0)  # this DeepSpeed builds no such op, so its CPU workers will not compile one either
    builder.load()
