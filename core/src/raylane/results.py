"""What comes back from the workers, and how the driver's Trainer and LightningModule take it in.

Beyond Lightning's spawn launcher: the driver also gets the loop progress (``current_epoch``, ``global_step``), every
callback's state (ModelCheckpoint's best paths and scores), the checkpoint files themselves when the driver cannot see
rank 0's files (another node, a Ray Client driver, another working directory), and predictions from every rank.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import KeysView
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from raylane import _lightning, worker_only_weights
from raylane.errors import WeightsNotOnDriverWarning
from raylane.storage import is_remote
from raylane.weights import pack_state_dict, unpack_state_dict

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.trainer.states import TrainerState

    from raylane.context import WorkerContext
    from raylane.host import BackendHost


@dataclass
class RankZeroOutput:
    """The Trainer state only rank 0 sends back."""

    trainer_state: TrainerState
    results: Any
    state_dict: dict[str, Any] | None  # tensors as raylane.weights.TensorBytes
    callback_metrics: dict[str, Any]
    logged_metrics: dict[str, Any]
    progress_bar_metrics: dict[str, Any]
    fit_loop_state: dict[str, Any] | None
    callback_states: dict[str, dict[str, Any]]
    files: dict[str, bytes]  # checkpoints and logs, when the driver runs on another node
    extras: dict[str, Any] = field(default_factory=dict)
    should_stop: bool = False  # a callback (EarlyStopping) ended the fit early
    learning_rate_searches: list[Any] = field(default_factory=list)  # LearningRateFinder callbacks (Tuner.lr_find)


@dataclass
class WorkerOutput:
    """One worker's return value from an entry point."""

    rank: int
    predictions: list[list[Any]] | None = None
    batch_indices: list[list[list[int]]] | None = None
    batch_sizes: list[int | None] | None = None
    rank_zero: RankZeroOutput | None = None
    marks: dict[str, float] = field(default_factory=dict)  # wall-clock start-up marks (time.time()), for benchmarks


def collect_output(trainer: pl.Trainer, results: Any, context: WorkerContext, host: BackendHost) -> WorkerOutput:
    """Run on every worker after the entry point; rank 0 includes the Trainer's state."""
    fn = trainer.state.fn
    # Every rank computes the state dict: torchmetrics may synchronise across ranks inside it.
    state_dict = pack_state_dict(trainer.strategy.state_dict_for_driver()) if weights_changed(trainer) else None
    output = WorkerOutput(rank=context.global_rank)
    if fn == _lightning.PREDICTING and results is not None and trainer.strategy.reports_predictions:
        output.predictions = _per_dataloader(_to_cpu(results), len(_lightning.predict_batch_indices(trainer)))
        output.batch_indices = _lightning.predict_batch_indices(trainer)
        output.batch_sizes = _lightning.predict_batch_sizes(trainer)
        results = None
    if context.global_rank != 0:
        return output
    output.rank_zero = RankZeroOutput(
        trainer_state=trainer.state,
        results=_to_cpu(results),
        state_dict=state_dict,
        callback_metrics=_to_cpu(dict(trainer.callback_metrics)),
        logged_metrics=_to_cpu(dict(trainer.logged_metrics)),
        progress_bar_metrics=_to_cpu(dict(trainer.progress_bar_metrics)),
        fit_loop_state=trainer.fit_loop.state_dict() if fn == _lightning.FITTING else None,
        callback_states={cb.state_key: _to_cpu(cb.state_dict()) for cb in trainer.callbacks if cb.state_dict()},
        files=_files_the_driver_cannot_see(trainer, context),
        extras=host.collect_results(trainer, context),
        should_stop=trainer.should_stop,
        learning_rate_searches=_lightning.learning_rate_searches(trainer) if fn == _lightning.FITTING else [],
    )
    return output


def weights_changed(trainer: pl.Trainer) -> bool:
    """Whether the entry point changed the model's weights: ``fit`` trains them, and any entry point given a
    checkpoint (``validate(ckpt_path="best")``) loads its weights into the model, which one process then holds."""
    return trainer.state.fn == _lightning.FITTING or trainer.ckpt_path is not None


def apply_output(trainer: pl.Trainer, output: RankZeroOutput, host: BackendHost) -> None:
    """Make the driver's Trainer and LightningModule look as if the entry point had run in this process."""
    if output.state_dict is not None:
        load_trained_weights(trainer.lightning_module, unpack_state_dict(output.state_dict))
    trainer.state = output.trainer_state
    trainer.should_stop = output.should_stop
    trainer.callback_metrics.update(output.callback_metrics)
    trainer.logged_metrics.update(output.logged_metrics)
    trainer.progress_bar_metrics.update(output.progress_bar_metrics)
    if output.fit_loop_state is not None:
        trainer.fit_loop.load_state_dict(output.fit_loop_state)
    for name, content in output.files.items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(content)
    checkpoint_callback = _lightning.namespace_of(trainer).callbacks.ModelCheckpoint
    for callback in trainer.callbacks:
        state = output.callback_states.get(callback.state_key)
        if state is None:
            continue
        if isinstance(callback, checkpoint_callback):
            # The directory is resolved inside the worker; adopt it so the full state (best scores) loads.
            callback.dirpath = state.get("dirpath", callback.dirpath)
        callback.load_state_dict(state)
    _lightning.adopt_learning_rate_searches(trainer, output.learning_rate_searches)
    host.apply_results(trainer, output.extras)


def driver_filesystem_node() -> str:
    """The Ray node whose filesystem the driver writes to; "" for a Ray Client driver, which runs on no Ray node.

    Ray Client answers ``get_node_id()`` with the head node that proxies it, but the driver's files live on the
    client's machine, so only "no node" makes rank 0 send its files there.
    """
    if ray.util.client.ray.is_connected():
        return ""
    return ray.get_runtime_context().get_node_id()


def _files_the_driver_cannot_see(trainer: pl.Trainer, context: WorkerContext) -> dict[str, bytes]:
    """All of rank 0's files for a driver on another node or a Ray Client driver; on the same node, the relative ones
    when the working directories differ, as those of a driver on the head node of a `ray start` cluster and of its
    workers do (they run in the directory of `ray start`)."""
    if context.placement.node_id != context.driver_node_id:
        return _files_for_driver(trainer)
    if context.driver_cwd and os.getcwd() != context.driver_cwd:
        return _files_for_driver(trainer, relative_only=True)
    return {}


def _files_for_driver(trainer: pl.Trainer, relative_only: bool = False) -> dict[str, bytes]:
    """Bytes of the checkpoints and logs rank 0 wrote, for a driver that cannot read them (no shared filesystem).

    Relative paths stay relative, so they land in the driver's working directory, where the driver's Trainer (its
    logger's ``log_dir``, the checkpoint callback's paths) looks for them.
    """
    paths: set[str] = set()
    checkpoint_callback = _lightning.namespace_of(trainer).callbacks.ModelCheckpoint
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, checkpoint_callback):
            paths.update(str(p) for p in (callback.best_model_path, callback.last_model_path) if p)
            paths.update(str(p) for p in callback.best_k_models)
    # URLs (s3://...) are not paths on this machine, and the driver reads them where they are: nothing to copy.
    paths = {path for path in paths if not is_remote(path)}
    # A sharded checkpoint is a directory (torch distributed checkpoint): each of its files comes back.
    paths.update(str(p) for path in list(paths) if os.path.isdir(path) for p in Path(path).rglob("*") if p.is_file())
    for logger in trainer.loggers:
        if logger.log_dir and not is_remote(logger.log_dir) and os.path.isdir(logger.log_dir):
            paths.update(str(p) for p in Path(logger.log_dir).rglob("*") if p.is_file() and not _in_checkpoint(p))
    if relative_only:
        paths = {path for path in paths if not os.path.isabs(path)}
    return {os.path.normpath(path): Path(path).read_bytes() for path in sorted(paths) if os.path.isfile(path)}


def _in_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a file inside a checkpoint directory: only the checkpoint callback's ones are sent."""
    return any(part.endswith(".ckpt") for part in path.parts)


def _per_dataloader(predictions: list[Any], num_dataloaders: int) -> list[list[Any]]:
    # Lightning returns a flat list for one dataloader and a list per dataloader otherwise.
    return [predictions] if num_dataloaders <= 1 else list(predictions)


def _to_cpu(data: Any) -> Any:
    return apply_to_collection(data, Tensor, lambda tensor: tensor.detach().cpu())


SHOWN_NAMES = 6


def load_trained_weights(module: torch.nn.Module, state_dict: dict[str, Any]) -> None:
    """Load the workers' weights into the driver's module; keep those it has no place for beside it.

    Not strict, as Lightning's spawn launcher: the workers' model may hold layers the driver's lacks (built in
    ``configure_model``). Lightning drops those silently; then a later validate/test/predict with this module builds
    them afresh, untrained, and evaluates that. raylane keeps them with the module for its next entry point
    (:mod:`raylane.worker_only_weights`) and says so. Weights renamed by ``torch.compile`` on the workers are renamed
    back.
    """
    driver_tensors = module.state_dict()
    state_dict = {_driver_name(name, driver_tensors.keys()): value for name, value in state_dict.items()}
    # Copying in place falls short in two cases; then the module takes the trained tensors themselves (own copies:
    # the received ones view Ray's object store, read-only). A model built on the meta device
    # (trainer.init_module(empty_init=True)) has no storage to copy into: the copy leaves it empty, and the next entry
    # point would start from fresh weights. And a copy would round weights trained in a wider dtype
    # (Trainer(precision="64-true") converts the workers' model to float64, as it converts one process's).
    assign = any(tensor.is_meta for tensor in driver_tensors.values()) or _narrower(driver_tensors, state_dict)
    if assign:
        state_dict = {name: _own_copy(value) for name, value in state_dict.items()}
    tied = _tied_parameter_names(module) if assign else []
    loaded = module.load_state_dict(state_dict, strict=False, assign=assign)
    for names in tied:
        _tie(module, names)
    worker_only_weights.keep(module, {name: state_dict[name] for name in loaded.unexpected_keys})
    if loaded.unexpected_keys:
        warnings.warn(_not_on_driver(loaded.unexpected_keys, loaded.missing_keys), WeightsNotOnDriverWarning, 2)


def _narrower(driver_tensors: dict[str, Any], trained: dict[str, Any]) -> bool:
    """Whether some trained floating-point tensor would lose precision in the driver's tensor of the same name."""
    for name, value in trained.items():
        mine = driver_tensors.get(name)
        floating = isinstance(value, Tensor) and isinstance(mine, Tensor) and value.is_floating_point()
        if floating and mine.is_floating_point() and torch.promote_types(mine.dtype, value.dtype) != mine.dtype:
            return True
    return False


def _own_copy(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _tied_parameter_names(module: torch.nn.Module) -> list[list[str]]:
    """The names of each parameter that several modules share (tied input and output embeddings, say)."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _tie(module: torch.nn.Module, names: list[str]) -> None:
    """Share the first name's parameter under the others again (loading by assignment gives each its own)."""
    shared = module.get_parameter(names[0])
    for name in names[1:]:
        owner, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner), attribute, shared)


def _driver_name(name: str, driver_names: KeysView[str]) -> str:
    plain = worker_only_weights.plain_name(name)
    return plain if name not in driver_names and plain in driver_names else name


def _not_on_driver(unexpected: list[str], missing: list[str]) -> str:
    kept = f" The driver's model kept its own values of {_names(missing)}." if missing else ""
    return (
        f"raylane: {len(unexpected)} trained tensors have no place in the driver's LightningModule "
        f"({_names(unexpected)}): the workers' model has layers this one lacks, built in configure_model.{kept} "
        "raylane keeps them with this model: the next fit/validate/test/predict given it loads them right after "
        "configure_model, as one process would keep the trained layers. But model.state_dict() here lacks them: save "
        "raylane.trained_state_dict(model) (or use the fit's checkpoints) to have every trained weight."
    )


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_NAMES} more" if len(keys) > SHOWN_NAMES else ""
    return ", ".join(keys[:SHOWN_NAMES]) + more
