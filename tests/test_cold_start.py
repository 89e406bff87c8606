"""A script that lets raylane start Ray: Ray starts at ``import raylane`` (or, in a script that imports Ray, when the
Trainer is built), the workers start with the Trainer and import torch and Lightning before the first entry point needs
them, ``RAYLANE_EARLY_START=0`` turns that off, a script that calls ``ray.init`` itself (even where raylane cannot see
it) gets its own Ray, and nothing of Ray outlives the script.

Each test runs a driver script in a fresh interpreter, as a user does (``python train.py``), with a Ray temp folder of
its own, so every process of that script's Ray can be found afterwards by its command line. The scripts do not import
``raylane.testing`` (which imports pytest, under which nothing starts early).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raylane.testing import env_without_ray_address, printed_report, python_path_running_at_startup

pytestmark = pytest.mark.timeout(300)
SCRIPT_TIMEOUT_S = 240
LEFTOVER_WAIT_S = (
    30.0  # Ray's worker processes exit on their own once their raylet is gone; give them time on a busy box
)

# Every Python process of the script's Ray runs this at start-up (PYTHONPATH): it notes when the process began to
# import Lightning, so a worker can say whether that happened before the script called fit().
SITECUSTOMIZE = """
import sys
import time


class _NoteLightningImport:
    def find_spec(self, name, path=None, target=None):
        if name == "pytorch_lightning" and not hasattr(sys, "lightning_import_started_at"):
            sys.lightning_import_started_at = time.time()
        return None


sys.meta_path.insert(0, _NoteLightningImport())
"""

# The script's model and helpers, a module next to it as a user's would be.
PROBE = """
import json
import os
import sys

import pytorch_lightning as pl
import torch


class Probe(pl.LightningModule):
    def __init__(self, report_dir):
        super().__init__()
        self.report_dir = report_dir
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(self.layer(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_start(self):
        report = {"lightning_import_started_at": sys.lightning_import_started_at, "pid": os.getpid()}
        with open(os.path.join(self.report_dir, f"rank{self.global_rank}.json"), "w") as out:
            json.dump(report, out)


def loader():
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=generator), torch.arange(32) % 2)
    return torch.utils.data.DataLoader(data, batch_size=8)


def trainer(**options):
    import raylane

    return pl.Trainer(
        max_epochs=1,
        strategy=raylane.get_strategy("ddp", workers=2, **options),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def rank_reports(report_dir):
    return [json.load(open(os.path.join(report_dir, f"rank{rank}.json"))) for rank in (0, 1)]


def ray_state():  # whether raylane began starting Ray at import, and the Ray the script has now (waited for)
    import ray
    from raylane import local_ray

    local_ray.wait_for_background_start()
    return {
        "started_at_import": local_ray.started_at_import(),
        "cpus": ray.cluster_resources()["CPU"] if ray.is_initialized() else None,
    }


def raylane_actor_pids():
    import ray

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("raylane:")]
    handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named]
    return sorted(ray.get([handle.pid.remote() for handle in handles]))
"""

TRAIN = """
import json, sys
import ray
import raylane
from probe import Probe, loader, rank_reports, raylane_actor_pids, trainer

report = {"ray_at_import": raylane.local_ray.started_at_import()}
fitting = trainer()
ready = fitting.strategy.launcher.early_workers_ready(timeout_s=150)  # the script's own work, as long as start-up
report.update({"ray_before_fit": ray.is_initialized(), "early_workers_ready": ready})
report["pids_before_fit"] = raylane_actor_pids() if ray.is_initialized() else []
fitting.fit(Probe(sys.argv[1]), loader())
report["ranks"] = rank_reports(sys.argv[1])
report["fit_called_at"] = fitting.strategy.launcher.timeline["driver"]["launch"]
print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    # Short and fresh: Ray's socket paths must stay under the OS limit, and the folder names this test's processes.
    path = Path(tempfile.mkdtemp(prefix="rlcs", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_script(
    tmp_path: Path,
    ray_tmpdir: Path,
    script: str,
    args: list[str] | None = None,
    ray_expected: bool = True,
    **env: str,
) -> dict[str, Any]:
    (tmp_path / "probe.py").write_text(PROBE)
    python_path = python_path_running_at_startup(SITECUSTOMIZE, tmp_path / "site")
    (tmp_path / "train.py").write_text(textwrap.dedent(script))
    reports = tmp_path / "reports"
    reports.mkdir()
    done = subprocess.run(
        [sys.executable, "train.py", str(reports), *(args or [])],
        cwd=tmp_path,
        env=env_without_ray_address({"RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": python_path, **env}),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    if ray_expected:
        assert_nothing_left_running(ray_tmpdir)
    else:
        assert not (ray_tmpdir / "ray").exists(), "the script started a Ray"
    return printed_report(done.stdout)


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited meanwhile
            continue
        if text in command:
            found.append(f"{proc.name}: {command[:160]}")
    return found


def assert_nothing_left_running(ray_tmpdir: Path) -> None:
    """No process of the script's Ray (raylet, GCS, workers, ...) outlives the script: each names the temp folder."""
    assert (ray_tmpdir / "ray").is_dir(), (
        f"the script's Ray did not use {ray_tmpdir}: the check below would see nothing"
    )
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while left := processes_mentioning(str(ray_tmpdir)):
        assert time.monotonic() < deadline, "Ray processes outlived the script:\n" + "\n".join(left)
        time.sleep(0.5)


def test_building_the_trainer_starts_ray_and_workers_that_import_lightning_before_fit(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    report = run_script(tmp_path, ray_tmpdir, TRAIN)
    assert not report["ray_at_import"], "a script that imports Ray picks when Ray starts: not at import raylane"
    assert report["ray_before_fit"] and report["early_workers_ready"], report
    trained_on = sorted(rank["pid"] for rank in report["ranks"])
    assert trained_on == report["pids_before_fit"], "fit trained on the workers started when the Trainer was built"
    imported = [rank["lightning_import_started_at"] for rank in report["ranks"]]
    assert all(at < report["fit_called_at"] for at in imported), "the workers imported Lightning before fit()"


def test_raylane_early_start_0_starts_nothing_before_fit(tmp_path: Path, ray_tmpdir: Path) -> None:
    report = run_script(tmp_path, ray_tmpdir, TRAIN, RAYLANE_EARLY_START="0")
    assert not report["ray_before_fit"] and not report["early_workers_ready"], report
    # The workers started in fit and imported Lightning when they loaded the Trainer.
    imported = [rank["lightning_import_started_at"] for rank in report["ranks"]]
    assert all(at > report["fit_called_at"] for at in imported), report


OWN_RAY_AFTER_THE_TRAINER = """
import json, sys
import ray
from probe import Probe, loader, rank_reports, trainer

fitting = trainer()
started_early = fitting.strategy.launcher.early_workers_ready(timeout_s=150) or ray.is_initialized()
ray.init(num_cpus=3, include_dashboard=False)  # the script's own Ray, after building the Trainer
fitting.fit(Probe(sys.argv[1]), loader())
report = {"started_early": started_early, "cpus": ray.cluster_resources()["CPU"], "ranks": rank_reports(sys.argv[1])}
print("REPORT " + json.dumps(report), flush=True)
"""


def test_a_script_that_calls_ray_init_after_building_the_trainer_trains_on_its_own_ray(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    report = run_script(tmp_path, ray_tmpdir, OWN_RAY_AFTER_THE_TRAINER)
    assert not report["started_early"], "raylane must not start Ray in a script that calls ray.init itself"
    assert report["cpus"] == 3 and len(report["ranks"]) == 2, report


# The script does not mention the call (it is in a module it imports), so raylane cannot see it coming.
HIDDEN_RAY_INIT = """
import json, sys
import ray
from probe import Probe, loader, rank_reports, trainer
from setup_cluster import connect

fitting = trainer()
assert fitting.strategy.launcher.early_workers_ready(timeout_s=150)
try:
    connect(ignore_reinit_error=False)
    outcome = "connected"
except RuntimeError as err:
    outcome = str(err)
connect(ignore_reinit_error=True)  # what the docs advise: keeps raylane's Ray
fitting.fit(Probe(sys.argv[1]), loader())
print("REPORT " + json.dumps({"outcome": outcome, "ranks": rank_reports(sys.argv[1])}), flush=True)
"""


def test_ray_init_hidden_from_raylane_after_its_early_start_fails_as_the_docs_say(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    write_setup_cluster(tmp_path)
    report = run_script(tmp_path, ray_tmpdir, HIDDEN_RAY_INIT)
    assert "ray.init twice" in report["outcome"], report["outcome"]  # Ray's own error, quoted in docs/startup.md
    assert len(report["ranks"]) == 2, report


def write_setup_cluster(tmp_path: Path) -> None:
    """A module of the user's that calls ``ray.init``: raylane reads only the script's own file, so it cannot see it."""
    (tmp_path / "setup_cluster.py").write_text(
        "import ray\n\n\ndef connect(**options):\n    ray.init(num_cpus=3, include_dashboard=False, **options)\n"
    )


# A script as users write it when they leave Ray to raylane: its file never imports Ray.
AT_IMPORT = """
import json, sys
import raylane
started_at_import = raylane.local_ray.started_at_import()
from probe import Probe, loader, rank_reports, ray_state, trainer

before_trainer = ray_state()
fitting = trainer(**OPTIONS)
fitting.fit(Probe(sys.argv[1]), loader())
report = {"started_at_import": started_at_import, "before_trainer": before_trainer, "after_fit": ray_state()}
report["ranks"] = rank_reports(sys.argv[1])
print("REPORT " + json.dumps(report), flush=True)
"""


def test_importing_raylane_starts_ray_before_any_trainer_and_the_first_fit_trains_on_it(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    report = run_script(tmp_path, ray_tmpdir, AT_IMPORT.replace("OPTIONS", "{}"))
    assert report["started_at_import"], report
    cpus = os.cpu_count()
    assert report["before_trainer"]["cpus"] == cpus, "Ray was up, sized for this machine, before any Trainer existed"
    assert report["after_fit"]["cpus"] == cpus and len(report["ranks"]) == 2, "fit trained on that same Ray"


def test_a_trainer_asking_for_more_cpus_than_the_ray_started_at_import_gets_a_ray_with_enough(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    cpus = os.cpu_count() or 1
    options = f"{{'cpus_per_worker': {cpus}}}"  # 2 workers: twice this machine's CPUs, oversubscribed on purpose
    report = run_script(tmp_path, ray_tmpdir, AT_IMPORT.replace("OPTIONS", options))
    assert report["started_at_import"] and report["before_trainer"]["cpus"] == cpus, report
    assert report["after_fit"]["cpus"] == 2 * cpus and len(report["ranks"]) == 2, report


HIDDEN_RAY_INIT_BEFORE_THE_TRAINER = """
import json, sys
import raylane
from probe import Probe, loader, rank_reports, ray_state, trainer
from setup_cluster import connect

started_at_import = raylane.local_ray.started_at_import()
connect()
fitting = trainer()
fitting.fit(Probe(sys.argv[1]), loader())
report = {"started_at_import": started_at_import, "after_fit": ray_state(), "ranks": rank_reports(sys.argv[1])}
print("REPORT " + json.dumps(report), flush=True)
"""


def test_a_ray_init_raylane_cannot_see_gets_its_own_ray_in_place_of_the_one_started_at_import(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    write_setup_cluster(tmp_path)
    report = run_script(tmp_path, ray_tmpdir, HIDDEN_RAY_INIT_BEFORE_THE_TRAINER)
    assert report["started_at_import"], "the script does not show its ray.init: raylane started Ray at import"
    assert report["after_fit"]["cpus"] == 3, "the call got the Ray it asked for, as it would without raylane"
    assert len(report["ranks"]) == 2, report


# Exits right after importing raylane, while its Ray may still be starting; with "spawn", a multiprocessing child
# first imports this file again (as "__mp_main__"), which imports raylane too.
IMPORT_ONLY = """
import json, multiprocessing, sys
import raylane


def child_started(queue):
    queue.put(raylane.local_ray.started_at_import())


if __name__ == "__main__":
    report = {"started_at_import": raylane.local_ray.started_at_import()}
    if "spawn" in sys.argv:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=child_started, args=(queue,))
        child.start()
        report["child_started_at_import"] = queue.get(timeout=120)
        child.join()
    print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.mark.parametrize(
    ("case", "header", "env"),
    [
        ("the script imports Ray itself", "import ray\n", {}),
        ("the script imports Ray among other modules", "import os, ray\n", {}),
        ("one rank of a job torchrun or Lightning's ddp launched", "", {"LOCAL_RANK": "0"}),
        ("the off switch", "", {"RAYLANE_EARLY_START": "0"}),
    ],
)
def test_import_starts_no_ray_where_the_script_does_not_leave_ray_to_raylane(
    case: str, header: str, env: dict[str, str], tmp_path: Path, ray_tmpdir: Path
) -> None:
    # The script exits right after the import. Where it does leave Ray to raylane, Ray starts and the exit, while it
    # is still starting, leaves nothing behind: the multiprocessing test below runs that case.
    report = run_script(tmp_path, ray_tmpdir, header + IMPORT_ONLY, ray_expected=False, **env)
    assert report["started_at_import"] is False, case


def test_a_multiprocessing_child_importing_the_script_again_starts_no_ray(tmp_path: Path, ray_tmpdir: Path) -> None:
    report = run_script(tmp_path, ray_tmpdir, IMPORT_ONLY, args=["spawn"])
    assert report == {"started_at_import": True, "child_started_at_import": False}, report


CHOSEN_CPUS = """
import json
import raylane
from probe import ray_state

started_at_import = raylane.local_ray.started_at_import()
raylane.start_ray_in_background(num_cpus=CPUS)
print("REPORT " + json.dumps({"started_at_import": started_at_import, "ray": ray_state()}), flush=True)
"""


def test_start_ray_in_background_replaces_a_ray_started_at_import_with_the_cpus_it_asks_for(
    tmp_path: Path, ray_tmpdir: Path
) -> None:
    cpus = (os.cpu_count() or 1) + 1
    report = run_script(tmp_path, ray_tmpdir, CHOSEN_CPUS.replace("CPUS", str(cpus)))
    assert report["started_at_import"] and report["ray"]["cpus"] == cpus, report


# Exits while the Trainer's workers are still starting (and, with three Trainers of 2 workers on this machine's CPUs,
# while some of them wait for resources): a Ray call after raylane stopped Ray would end the script with status 1.
EXIT_WHILE_WORKERS_START = """
import json
import raylane
from probe import trainer

trainers = [trainer() for _ in range(3)]
print("REPORT " + json.dumps({"built": len(trainers)}), flush=True)
"""


def test_a_script_that_exits_while_its_trainers_workers_start_exits_cleanly(tmp_path: Path, ray_tmpdir: Path) -> None:
    assert run_script(tmp_path, ray_tmpdir, EXIT_WHILE_WORKERS_START) == {"built": 3}
