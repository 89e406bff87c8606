"""A Tune script written against the unified ``lightning`` package: the report callbacks serve its Trainer, and
raylane_tune does not import ``pytorch_lightning`` beside it (which would leave ``get_strategy`` unable to tell which
Lightning the Trainer comes from)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raylane.testing import printed_report

SCRIPT = Path(__file__).parent / "scripts" / "lightning_pytorch_trial.py"


@pytest.mark.timeout(300)
def test_a_lightning_pytorch_trial_reports_each_epoch_without_naming_its_lightning(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "storage")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    report = printed_report(done.stdout)
    assert report["error"] == "None"
    assert report["iterations"] == [1, 2], "one report per epoch, from rank 0 of the 2 workers"
    assert report["namespaces"] == ["lightning.pytorch"]
