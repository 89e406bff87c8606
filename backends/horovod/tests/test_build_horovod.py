"""The Horovod build script's offline parts: the patches, the sdist check, the cache key and the cached second run."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from raylane_horovod import build_horovod


def write_sources(root: Path, fixed_upstream: bool = False) -> None:
    """Files shaped like the sdist's, around the lines the patches change."""
    for patch in build_horovod.PATCHES:
        path = root / patch.path
        path.parent.mkdir(parents=True, exist_ok=True)
        line = patch.new if fixed_upstream else patch.old
        if not path.exists():
            path.write_text(f"# {patch.path}\n")
        path.write_text(path.read_text() + f"before\n    {line}\nafter\n")


def test_patches_change_exactly_their_lines(tmp_path: Path) -> None:
    write_sources(tmp_path)
    build_horovod.apply_patches(tmp_path)
    cmake = (tmp_path / "CMakeLists.txt").read_text()
    assert "set(CMAKE_CXX_STANDARD 17)" in cmake and "CMAKE_CXX_STANDARD 14" not in cmake
    assert "set(CMAKE_CXX_STANDARD 17)" in (tmp_path / "horovod" / "torch" / "CMakeLists.txt").read_text()
    controller = (tmp_path / "horovod" / "common" / "gloo" / "gloo_controller.cc").read_text()
    assert "global_ranks_.resize(size_);" in controller and "reserve" not in controller


def test_patches_refuse_sources_they_were_not_written_for(tmp_path: Path) -> None:
    write_sources(tmp_path, fixed_upstream=True)  # e.g. a future release that fixed it already
    with pytest.raises(SystemExit, match="expected `set\\(CMAKE_CXX_STANDARD 14\\)` once, found it 0"):
        build_horovod.apply_patches(tmp_path)


def test_cache_key_names_everything_the_binary_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOROVOD_GPU_OPERATIONS", raising=False)
    key = build_horovod.cache_key()
    torch_version = importlib.metadata.version("torch").replace("+", "_")
    assert key.startswith(f"horovod-{build_horovod.HOROVOD_VERSION}_patches-")
    assert f"_torch-{torch_version}_cp{sys.version_info.major}{sys.version_info.minor}_" in key
    monkeypatch.setenv("HOROVOD_GPU_OPERATIONS", "NCCL")
    assert build_horovod.cache_key() != key, "a GPU build must not reuse the CPU wheel"


def test_second_run_reuses_the_cached_wheel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = tmp_path / build_horovod.cache_key() / f"horovod-{build_horovod.HOROVOD_VERSION}-cp311-cp311-linux.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"cached")
    assert build_horovod.main(["--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out
    assert out.strip().endswith(str(wheel))


def test_sdist_with_another_hash_is_rejected(tmp_path: Path) -> None:
    sdist = tmp_path / build_horovod.SDIST_NAME
    sdist.write_bytes(b"not the release")
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        build_horovod.verify_sdist(sdist)
