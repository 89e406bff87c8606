"""What every GPU check script here shares: each check runs in its own directory, records its figures and every
failed expectation, and a crash fails only that check; the script prints a JSON summary (and writes it to the path
given as its argument) and exits non-zero when anything failed, so a lent GPU machine's run cannot pass silently."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import ray
import torch

from raylane import ConfigurationError

Expect = Callable[[bool, str], object]
Check = Callable[[Path, dict[str, Any], Expect], None]


def run_checks(what: str, checks: Mapping[str, Check]) -> NoReturn:
    """Run every check (in order, each after any earlier failure), print the summary and exit with its verdict."""
    summary: dict[str, Any] = {}
    failures: list[str] = []
    try:
        summary.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
        ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False)
        with tempfile.TemporaryDirectory() as tmp_name:
            for name, check in checks.items():
                directory = Path(tmp_name) / name
                directory.mkdir()
                summary[name] = _run_one(name, check, directory, failures)
    except Exception:  # no GPU, no Ray: nothing was checked
        summary["crash"] = traceback.format_exc()
        failures.append("the checks could not start")
    summary["failures"] = failures
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    print("FAILED: " + "; ".join(failures) if failures else f"all {what} GPU checks passed", file=sys.stderr)
    sys.exit(1 if failures else 0)


def _run_one(name: str, check: Check, directory: Path, failures: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    try:
        check(directory, figures, lambda ok, why: ok or failures.append(f"{name}: {why}"))
    except Exception:
        figures["crash"] = traceback.format_exc()
        failures.append(f"{name}: crashed ({traceback.format_exc(limit=0).strip()})")
    return figures


def expect_refused_before_start(attempt: Callable[[], object], figures: dict[str, Any], expect: Expect) -> None:
    """Two workers sharing one GPU over NCCL (which NCCL refuses) must fail on the driver, fast, not hang."""
    started = time.monotonic()
    try:
        attempt()
    except ConfigurationError as err:
        figures.update(outcome="ConfigurationError", message_head=str(err)[:300])
    except Exception as err:
        figures.update(outcome=type(err).__name__, message_head=str(err)[:300])
    else:
        figures["outcome"] = "trained"
    figures["seconds"] = round(time.monotonic() - started, 1)
    expect(figures["outcome"] == "ConfigurationError", f"NCCL on a shared GPU must be refused: {figures['outcome']}")
    expect(figures["seconds"] < 30, f"the refusal took {figures['seconds']} s")
