"""``raylane backends``: which backends are installed and whether each one imports."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raylane import _lightning
from raylane.errors import RaylaneError
from raylane.registry import backend_host, list_backends


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raylane", description="Distributed Lightning training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backends", help="list installed backends (name, distribution, version, import status)")
    args = parser.parse_args(argv)
    if args.command == "backends":
        return print_backends()
    return 2  # pragma: no cover - argparse rejects unknown commands


def print_backends() -> int:
    try:
        backends = list_backends()
    except RaylaneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not backends:
        print("No raylane backends are installed. Install one, e.g. `pip install raylane-ddp`.")
        return 0
    rows = [("NAME", "DISTRIBUTION", "VERSION", "STATUS")]
    for info in backends:
        try:
            # pytorch_lightning is core's own dependency, so always installed.
            backend_host(info.name).strategy_class(_lightning.namespace("pytorch_lightning"))
            status = "ok"
        except RaylaneError as err:
            status = f"unusable: {err}"
        rows.append((info.name, info.distribution, info.version, status))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
