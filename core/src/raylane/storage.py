"""Checkpoints and logs on remote storage (s3://, gs://, az:// ... through fsspec): found on the driver, checked on
rank 0 before the entry point.

Lightning writes to any fsspec URL by itself; what a long run needs on top is to learn at once, not after the first
epoch or after a preemption, that the workers cannot use the URL: the filesystem package is missing where they run,
the bucket does not exist, or the store refuses their credentials. The check runs where the checkpoints are written
(rank 0, with the workers' environment and packages), before the Trainer is unpickled there (unpickling a
ModelCheckpoint that writes to S3 already needs s3fs). Error messages never carry a credential's value.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec.utils import get_protocol

from raylane import _lightning
from raylane.errors import StorageError

if TYPE_CHECKING:
    import pytorch_lightning as pl

CHECK_TIMEOUT_S = 60.0
LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Where each store's fsspec package reads its credentials: named in the error when the store refuses them.
CREDENTIAL_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials; "
    "AWS_ENDPOINT_URL for an S3-compatible store other than AWS)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service account key file present on every node)",
    "az": "AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}
_SAME_STORE = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}
# Environment variable names whose values are never shown (checked as upper-case substrings).
SECRET_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY", "ACCOUNT_KEY", "CONNECTION_STRING")


def is_remote(path: object) -> bool:
    """Whether ``path`` is a URL of a filesystem other than this machine's (``s3://...``, not ``/tmp`` or ``last``)."""
    return get_protocol(str(path)) not in LOCAL_PROTOCOLS


@dataclass(frozen=True)
class StorageTargets:
    """The remote URLs an entry point uses: directories rank 0 writes to, and checkpoints it reads."""

    write: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.write or self.read)


def find_targets(trainer: pl.Trainer, ckpt_path: object = None) -> StorageTargets:
    """*Driver.* The remote URLs of the Trainer's checkpoint callbacks, loggers and ``default_root_dir``, and
    ``ckpt_path``. Reads attributes only: nothing is imported or contacted here."""
    write: list[str] = [str(trainer.default_root_dir)]
    checkpoint_callback = _lightning.namespace_of(trainer).callbacks.ModelCheckpoint
    write += [str(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, checkpoint_callback) and cb.dirpath]
    write += [str(logger.save_dir) for logger in trainer.loggers if logger.save_dir]
    read = [str(ckpt_path)] if ckpt_path is not None else []
    return StorageTargets(write=_remote(write), read=_remote(read))


def _remote(urls: list[str]) -> tuple[str, ...]:
    """The remote ones of ``urls``, each once, in order."""
    return tuple(dict.fromkeys(url for url in urls if is_remote(url)))


def check_targets(targets: StorageTargets, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """*Rank 0.* Raise :class:`StorageError` unless every write target takes a small probe object (removed at once)
    and every read target exists. A store that does not answer within ``timeout_s`` is an error too."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            for url in targets.write:
                _check_writable(url)
            for url in targets.read:
                _check_readable(url)
        except BaseException as err:
            outcome.append(err)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="raylane-storage-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        urls = ", ".join(targets.write + targets.read)
        raise StorageError(
            f"The storage of {urls} did not answer the workers within {timeout_s:g} s. Check that its endpoint is "
            "reachable from every node (for an S3-compatible store, AWS_ENDPOINT_URL in get_strategy(env=...))."
        )
    if outcome[0] is not None:
        raise outcome[0]


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with the value of every credential-like environment variable replaced by ``***``."""
    environ = dict(os.environ) if environ is None else environ
    for name, value in environ.items():
        if len(value) >= 4 and any(part in name.upper() for part in SECRET_NAME_PARTS):
            text = text.replace(value, "***")
    return text


def open_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path within it; a :class:`StorageError` that says what to install
    when the package for its protocol is missing."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = get_protocol(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as err:
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0] or f"the {protocol} package"
        raise StorageError(
            f"{url} needs the Python package {package!r}, which the workers cannot import ({err}). Install it where "
            f"the workers run: `pip install {package}` on every node's Python, or "
            f"get_strategy(..., runtime_env={{'pip': ['{package}']}})."
        ) from None
    except ValueError:
        raise StorageError(f"{url}: fsspec knows no filesystem for '{protocol}://'. Check the URL.") from None
    # A fresh instance: the credentials in this process's environment now, not a cached client's.
    return fsspec.core.url_to_fs(url, skip_instance_cache=True)


def _check_writable(url: str) -> None:
    filesystem, path = open_filesystem(url)
    probe = f"{path.rstrip('/')}/.raylane-write-check-{uuid.uuid4().hex}"
    try:
        filesystem.pipe_file(probe, b"")
        filesystem.rm_file(probe)
    except Exception as err:
        raise _explain(url, filesystem, path, err, "write to") from None


def _check_readable(url: str) -> None:
    filesystem, path = open_filesystem(url)
    try:
        filesystem.info(path)
    except FileNotFoundError as err:
        if _bucket_missing(filesystem, url, path):
            raise _explain(url, filesystem, path, err, "read") from None
        raise StorageError(f"ckpt_path={url}: no such checkpoint (the workers see no object there).") from None
    except Exception as err:
        raise _explain(url, filesystem, path, err, "read") from None


def _explain(url: str, filesystem: Any, path: str, err: Exception, action: str) -> StorageError:
    reason = redact(f"{type(err).__name__}: {err}")
    if _bucket_missing(filesystem, url, path):
        bucket = path.strip("/").split("/")[0]
        return StorageError(
            f"{url}: the bucket {bucket!r} does not exist. Create it before the run, or fix the URL. ({reason})"
        )
    if isinstance(err, PermissionError):
        protocol = get_protocol(url)
        names = CREDENTIAL_HINTS.get(_SAME_STORE.get(protocol, protocol), "the credentials its fsspec package reads")
        return StorageError(
            f"{url}: the store refused the workers' credentials ({reason}). Give the workers credentials that may "
            f"{action} it: {names}, in get_strategy(env={{...}}) or runtime_env={{'env_vars': {{...}}}}, or through "
            "each node's own configuration (instance role, ~/.aws)."
        )
    return StorageError(f"{url}: the workers cannot {action} it ({reason}).")


def _bucket_missing(filesystem: Any, url: str, path: str) -> bool:
    """Whether the bucket (or container) of an object-store URL does not exist; False when unsure."""
    protocol = get_protocol(url)
    bucket = path.strip("/").split("/")[0]
    if _SAME_STORE.get(protocol, protocol) not in CREDENTIAL_HINTS or not bucket:
        return False
    try:
        filesystem.invalidate_cache()
        filesystem.info(bucket)
    except FileNotFoundError:
        return True
    except Exception:  # refused, for one: say what the store said instead
        return False
    return False
