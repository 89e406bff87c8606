"""The complete minimal backend that docs/backends.md shows inline works as written: installed from the page's own
code blocks (a distribution with its entry point), it trains on two workers with the process group its hook made."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from raylane.testing import env_without_ray_address, printed_report

PAGE = Path(__file__).resolve().parents[1] / "docs" / "backends.md"

FIT = """
import json
import pytorch_lightning as pl
from raylane import get_strategy, list_backends
from raylane.testing import ClassifierModel, make_loader

model = ClassifierModel(report_dir=".")
trainer = pl.Trainer(max_epochs=1, strategy=get_strategy("mine", workers=2), logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, make_loader(8), make_loader(8))
reports = [json.load(open(f"fit-rank{rank}.json")) for rank in range(2)]
print("REPORT " + json.dumps({
    "backends": [info.name for info in list_backends()],
    "world_size": [r["world_size"] for r in reports],
    "group_from_backend": [r["process_group_from_backend"] for r in reports],
    "global_step": trainer.global_step,
}))
"""


def _inline_files() -> dict[str, str]:
    """The page's code blocks whose first line names a file (``# pyproject.toml``, ``# src/...py: ...``)."""
    blocks = re.findall(r"```(?:toml|python)\n# ([\w./]+)[^\n]*\n(.*?)```", PAGE.read_text(), re.DOTALL)
    return {name: body for name, body in blocks}


def _install(files: dict[str, str], site: Path) -> None:
    """What ``pip install`` would leave: the package on the path and a dist-info with the entry points."""
    pyproject = files["pyproject.toml"]  # read with re: tomllib is Python 3.11+, raylane supports 3.10
    distribution, version = (
        re.search(rf'^{key} = "([^"]+)"', pyproject, re.MULTILINE).group(1) for key in ("name", "version")
    )
    [(group, entry_points)] = re.findall(r'^\[project\.entry-points\."([^"]+)"\]\n((?:\w+ = .*\n)+)', pyproject, re.M)
    for name, body in files.items():
        if name.startswith("src/"):
            target = site / name.removeprefix("src/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    # TOML's `mine = "raylane_mine"  # comment` is entry_points.txt's `mine = raylane_mine`.
    lines = [line.split("#")[0].strip().replace('"', "") for line in entry_points.splitlines()]
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "\n".join(lines) + "\n")


def test_the_page_shows_every_file_of_the_backend() -> None:
    files = _inline_files()
    assert {"pyproject.toml", "src/raylane_mine/__init__.py", "src/raylane_mine/strategy.py"} <= set(files), files
    assert "tests/test_mine.py" in files, "the page shows how to run the conformance suite"


@pytest.mark.timeout(240)
def test_the_minimal_backend_from_the_page_trains_with_its_own_process_group(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _install(_inline_files(), site)
    env = env_without_ray_address({"PYTHONPATH": str(site) + ":" + ":".join(sys.path)})
    done = subprocess.run(
        [sys.executable, "-c", FIT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=220
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    report = printed_report(done.stdout)
    assert "mine" in report["backends"]
    assert report["world_size"] == [2, 2] and report["global_step"] == 4
    assert report["group_from_backend"] == [True, True], "the page's setup hook must make the process group in use"
