"""Build (or reuse) a Horovod wheel that works with the installed torch, and optionally install it.

Horovod 0.28.1, the last release, does not build against torch >= 2.1 as published: its CMake files force C++14 and
torch's headers need C++17 (upstream horovod#3996; the fix, horovod#3998, was never released). This script makes the
build reproducible:

1. download the 0.28.1 sdist from PyPI with pip and check it against the pinned sha256;
2. apply ``PATCHES``: raise the C++ standard to 17 in ``CMakeLists.txt`` and ``horovod/torch/CMakeLists.txt``, and
   fix the Gloo controller's rank list so that Horovod's stall shutdown works (see ``PATCHES``);
3. build a wheel without build isolation (so it compiles against *this* interpreter's torch) with PyTorch and the
   Gloo controller only: no MPI, TensorFlow or MXNet;
4. cache the wheel outside the repository, keyed by Horovod version, patches, torch version, Python tag and
   platform, so a second run is instant.

Usage (with the interpreter that should get Horovod)::

    python backends/horovod/build_horovod.py            # build or reuse; print the wheel's path
    python backends/horovod/build_horovod.py --install  # ... and pip-install it into this interpreter

Standard library only: it runs before anything else is known to be installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import astuple, dataclass
from pathlib import Path

HOROVOD_VERSION = "0.28.1"
SDIST_NAME = f"horovod-{HOROVOD_VERSION}.tar.gz"
SDIST_SHA256 = "92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0"


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` with ``new`` in one file of the sdist. ``old`` must occur exactly once: anything else means the
    sdist is not the one the patch was written for, and the build stops instead of half-patching it."""

    path: str
    old: str
    new: str
    why: str


PATCHES = (
    # torch >= 2.1's headers need C++17 (horovod#3996; the fix, horovod#3998, was never released).
    Patch("CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)", "C++14 -> C++17"),
    Patch("horovod/torch/CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)", "set(CMAKE_CXX_STANDARD 17)", "C++14 -> C++17"),
    # The Gloo controller fills its list of the process set's ranks through data() after only reserve(), so the
    # list stays empty: the stall inspector then finds no rank missing, and HOROVOD_STALL_SHUTDOWN_TIME_SECONDS never
    # shuts a stalled job down. raylane maps collective_timeout onto it, so the list must have its ranks.
    Patch(
        "horovod/common/gloo/gloo_controller.cc",
        "global_ranks_.reserve(size_);",
        "global_ranks_.resize(size_);",
        "stall shutdown with the Gloo controller",
    ),
)

BUILD_ENV = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    "HOROVOD_CPU_OPERATIONS": "GLOO",
}
# Set by the user for a GPU build (e.g. HOROVOD_GPU_OPERATIONS=NCCL); they change the binary, so they key the cache.
GPU_BUILD_VARIABLES = ("HOROVOD_GPU_OPERATIONS", "HOROVOD_GPU_ALLREDUCE", "HOROVOD_GPU_BROADCAST", "HOROVOD_GPU")
BUILD_REQUIREMENTS = {"setuptools": "setuptools", "wheel": "wheel", "packaging": "packaging"}
MIN_CMAKE = (3, 13)


def log(message: str) -> None:
    print(f"[build_horovod] {message}", flush=True)


def default_cache_dir() -> Path:
    if os.environ.get("RAYLANE_WHEEL_CACHE"):
        return Path(os.environ["RAYLANE_WHEEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raylane" / "wheels"


def torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("[build_horovod] torch is not installed in this interpreter; install it first (e.g. torch==2.13.0)")


def cache_key() -> str:
    """Everything the binary depends on: Horovod and the patches, torch (its C++ ABI), the Python tag, the platform,
    GPU options."""
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    patches = hashlib.sha256(repr([astuple(patch) for patch in PATCHES]).encode()).hexdigest()[:8]
    parts = [f"horovod-{HOROVOD_VERSION}", f"patches-{patches}", f"torch-{torch_version()}", python_tag]
    parts.append(sysconfig.get_platform())
    gpu = [f"{name}={os.environ[name]}" for name in GPU_BUILD_VARIABLES if os.environ.get(name)]
    if gpu:
        parts.append("gpu-" + hashlib.sha256(";".join(gpu).encode()).hexdigest()[:12])
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))


def cached_wheel(cache_dir: Path) -> Path | None:
    wheels = sorted((cache_dir / cache_key()).glob(f"horovod-{HOROVOD_VERSION}-*.whl"))
    return wheels[0] if wheels else None


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, env=env)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(workdir: Path) -> Path:
    pip("download", "--no-deps", "--no-binary", ":all:", f"horovod=={HOROVOD_VERSION}", "--dest", str(workdir))
    sdist = workdir / SDIST_NAME
    if not sdist.is_file():
        sys.exit(f"[build_horovod] pip download did not produce {SDIST_NAME}")
    verify_sdist(sdist)
    return sdist


def verify_sdist(sdist: Path) -> None:
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        sys.exit(f"[build_horovod] sha256 mismatch for {sdist.name}: expected {SDIST_SHA256}, got {actual}")
    log(f"{sdist.name}: sha256 ok")


def unpack(sdist: Path, workdir: Path) -> Path:
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(workdir, filter="data")
        else:  # pragma: no cover - Python without PEP 706 backports
            archive.extractall(workdir)
    return workdir / f"horovod-{HOROVOD_VERSION}"


def apply_patches(source: Path) -> None:
    for patch in PATCHES:
        path = source / patch.path
        text = path.read_text()
        count = text.count(patch.old)
        if count != 1:
            sys.exit(f"[build_horovod] {patch.path}: expected `{patch.old}` once, found it {count} time(s)")
        path.write_text(text.replace(patch.old, patch.new))
        log(f"patched {patch.path}: {patch.why}")


def cmake_is_usable() -> bool:
    cmake = shutil.which("cmake")
    if cmake is None:
        return False
    output = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"version\s*(\d+)\.(\d+)", output)
    return bool(found) and (int(found.group(1)), int(found.group(2))) >= MIN_CMAKE


def ensure_build_requirements() -> None:
    """`--no-build-isolation` builds with what this interpreter has; add what Horovod's setup.py needs."""
    missing = [req for module, req in BUILD_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
    if not cmake_is_usable():
        missing.append(f"cmake>={MIN_CMAKE[0]}.{MIN_CMAKE[1]}")
    if missing:
        pip("install", *missing)


def build_wheel(cache_dir: Path, jobs: int) -> Path:
    target = cache_dir / cache_key()
    ensure_build_requirements()
    with tempfile.TemporaryDirectory(prefix="raylane-horovod-build-") as tmp:
        workdir = Path(tmp)
        source = unpack(download_sdist(workdir), workdir)
        apply_patches(source)
        env = {**os.environ, **BUILD_ENV, "MAKEFLAGS": f"-j{jobs}"}
        # The pip-installed cmake lands next to the interpreter, which may not be on PATH (a venv not activated).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        log(f"building the wheel with {jobs} job(s); this takes a few minutes")
        built = workdir / "dist"
        pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(built), str(source), env=env)
        wheels = list(built.glob("horovod-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"[build_horovod] expected one wheel in {built}, found {wheels}")
        target.mkdir(parents=True, exist_ok=True)
        # Copy under a temporary name, then rename: a concurrent run never sees a half-written wheel.
        partial = target / (wheels[0].name + ".partial")
        shutil.copyfile(wheels[0], partial)
        final = target / wheels[0].name
        partial.replace(final)
    log(f"cached {final}")
    return final


def horovod_torch_imports() -> bool:
    check = "import horovod.torch as hvd; assert hvd.gloo_built(), 'Horovod was built without Gloo'"
    return subprocess.run([sys.executable, "-c", check], capture_output=True, check=False).returncode == 0


def install(wheel: Path) -> None:
    # Replace any Horovod of the same version (an earlier build, or one without these patches), then add its
    # dependencies.
    pip("install", "--force-reinstall", "--no-deps", str(wheel))
    pip("install", str(wheel))
    if not horovod_torch_imports():
        subprocess.run([sys.executable, "-c", "import horovod.torch"], check=False)  # show the error
        sys.exit("[build_horovod] the installed Horovod does not import with torch; rebuild with --rebuild")
    log("horovod.torch imports, with Gloo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="pip-install the wheel into this interpreter")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cached wheel and build again")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where built wheels are kept")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    args = parser.parse_args(argv)

    wheel = None if args.rebuild else cached_wheel(args.cache_dir)
    if wheel is not None:
        log(f"reusing {wheel}")
    else:
        wheel = build_wheel(args.cache_dir, args.jobs)
    if args.install:
        install(wheel)
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
