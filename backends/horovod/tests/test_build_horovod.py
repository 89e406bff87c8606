"""The Horovod build script's offline parts: the patch, the cache key and the instant second run."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from raylane_horovod import build_horovod


def write_sources(root: Path, standard: str = "14") -> None:
    (root / "horovod" / "torch").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text(f"project(horovod CXX)\nset(CMAKE_CXX_STANDARD {standard})\n")
    torch_cmake = f'if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD {standard})\nendif()\n'
    (root / "horovod" / "torch" / "CMakeLists.txt").write_text(torch_cmake)


def test_patch_raises_the_cxx_standard_to_17(tmp_path: Path) -> None:
    write_sources(tmp_path)
    build_horovod.patch_cxx_standard(tmp_path)
    for relative in build_horovod.CXX17_PATCH:
        text = (tmp_path / relative).read_text()
        assert "set(CMAKE_CXX_STANDARD 17)" in text
        assert "CMAKE_CXX_STANDARD 14" not in text


def test_patch_refuses_sources_it_was_not_written_for(tmp_path: Path) -> None:
    write_sources(tmp_path, standard="17")  # e.g. a future release that already fixed it
    with pytest.raises(SystemExit, match="expected 1 C\\+\\+14 line"):
        build_horovod.patch_cxx_standard(tmp_path)


def test_cache_key_names_everything_the_binary_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOROVOD_GPU_OPERATIONS", raising=False)
    key = build_horovod.cache_key()
    torch_version = importlib.metadata.version("torch").replace("+", "_")
    assert key.startswith(f"horovod-{build_horovod.HOROVOD_VERSION}_torch-{torch_version}_")
    assert f"cp{sys.version_info.major}{sys.version_info.minor}" in key
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
