import json
from pathlib import Path
from typing import Any

from raylane.testing.s3 import s3_server  # noqa: F401  (the fixture: a real S3-compatible server)


def read_reports(directory: Path, stage: str = "fit") -> list[dict[str, Any]]:
    """The per-rank JSON reports ClassifierModel(report_dir=...) wrote, in rank order."""
    reports = [json.loads(path.read_text()) for path in directory.glob(f"{stage}-rank*.json")]
    return sorted(reports, key=lambda report: report["global_rank"])
