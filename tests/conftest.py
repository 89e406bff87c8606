import json
import os
from pathlib import Path
from typing import Any

from raylane.testing.s3 import s3_server  # noqa: F401  (the fixture: a real S3-compatible server)

# No warm pool (raylane.warm_pool) on the multi-node clusters these tests start: every group that stops would leave
# processes importing torch behind, on the 2 cores the next test runs on. Its own tests turn it on for their drivers.
os.environ.setdefault("RAYLANE_WARM_POOL", "0")


def read_reports(directory: Path, stage: str = "fit") -> list[dict[str, Any]]:
    """The per-rank JSON reports ClassifierModel(report_dir=...) wrote, in rank order."""
    reports = [json.loads(path.read_text()) for path in directory.glob(f"{stage}-rank*.json")]
    return sorted(reports, key=lambda report: report["global_rank"])
