"""``RayHorovodStrategy``: data-parallel training with ``hvd.DistributedOptimizer``, launched on raylane's Ray workers.

Lightning 2 removed its Horovod strategy, so this one carries its own, on public Lightning hooks only:

- ``setup_optimizers`` broadcasts rank 0's weights and optimizer state, then wraps each optimizer in Horovod's
  ``DistributedOptimizer``, whose backward hooks start each gradient's allreduce as soon as it is ready.
- ``post_backward`` waits for those allreduces (``synchronize``), so Lightning's ``on_before_optimizer_step``,
  gradient clipping and AMP unscaling see averaged gradients. ``optimizer_step`` then steps inside
  ``skip_synchronize``: Lightning hands the closure to ``optimizer.step``, and Horovod would otherwise synchronise
  before the closure has run the backward pass.
- With ``accumulate_grad_batches = k`` the wrappers wait for ``k`` backward passes (``backward_passes_per_step``)
  and ``post_backward`` synchronises only at the step that ends the accumulation (``block_backward_sync`` marks the
  others), so the allreduce runs once per optimizer step, as with DDP's ``no_sync``.
- ``reduce``, ``all_gather``, ``broadcast`` and ``barrier`` are Horovod collectives.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import horovod.torch as hvd
import torch
from torch import Tensor
from torch.distributed import ReduceOp

from raylane.strategy import RayClusterEnvironment, RayStrategyMixin
from raylane_horovod.settings import OptimizerSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    import pytorch_lightning as pl
    from torch import nn
    from torch.optim import Optimizer

REDUCE_OPS = {"mean": "Average", "avg": "Average", "sum": "Sum", "max": "Max", "min": "Min", "product": "Product"}
# Names of torch's ReduceOp members, for Lightning callers that pass those instead of strings.
TORCH_REDUCE_OPS = {"SUM": "sum", "AVG": "avg", "MAX": "max", "MIN": "min", "PRODUCT": "product"}
BROADCAST_NAME = "raylane.broadcast"
# The methods hvd.DistributedOptimizer adds or overrides (``step`` is LightningOptimizer's own).
HOROVOD_OPTIMIZER_METHODS = (
    "zero_grad",
    "load_state_dict",
    "synchronize",
    "skip_synchronize",
    "set_backward_passes_per_step",
)


class RayHorovodStrategy(RayStrategyMixin, lightning_base="ParallelStrategy"):
    """Horovod across ``workers`` Ray actors. Build it with ``get_strategy("horovod", workers=N, ...)``."""

    backend_name: ClassVar[str] = "horovod"
    strategy_name = "ray_horovod"
    # Lightning hands Trainer(num_nodes=...) only to strategies that have the attribute, and reads it back as
    # trainer.num_nodes, which raylane rejects when it is not 1 (Ray decides where the workers go).
    num_nodes: int = 1

    def __init__(self, workers: int = 2, **options: Any) -> None:
        horovod_options = self.init_ray_options({"workers": workers, **options})
        self.optimizer_settings = OptimizerSettings.from_options(horovod_options)
        super().__init__(cluster_environment=RayClusterEnvironment())
        self._horovod_optimizers: list[Optimizer] = []  # the DistributedOptimizers, inside a worker's fit
        self._accumulating = False

    @property
    def is_distributed(self) -> bool:
        return True  # Lightning asks custom strategies this to decide on distributed samplers

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if hvd.is_initialized():
            return {"num_replicas": hvd.size(), "rank": hvd.rank()}
        return super().distributed_sampler_kwargs

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- training ----------------------------------------------------------------------------------------------------

    @property
    def optimizers(self) -> list[Optimizer]:
        return super().optimizers  # type: ignore[misc,no-any-return]

    @optimizers.setter
    def optimizers(self, optimizers: list[Optimizer]) -> None:
        self.lightning.strategies.ParallelStrategy.optimizers.fset(self, optimizers)  # type: ignore[union-attr]
        if any(optimizer in self._horovod_optimizers for optimizer in optimizers):
            self._route_horovod_methods()

    def _route_horovod_methods(self) -> None:
        """Make Horovod's optimizer methods work on the ``LightningOptimizer`` that ``self.optimizers()`` returns.

        ``LightningOptimizer`` imitates an optimizer by subclassing its class, and Horovod's methods call
        ``super(self.__class__, self)``, which on such a subclass calls the same method again, forever. Each
        ``LightningOptimizer`` gets these methods bound to the Horovod optimizer it wraps instead.
        """
        assert self.lightning_module is not None
        wrappers = self.lightning_module.optimizers()
        for wrapper in wrappers if isinstance(wrappers, list) else [wrappers]:
            for name in HOROVOD_OPTIMIZER_METHODS:
                setattr(wrapper, name, getattr(wrapper.optimizer, name))

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if trainer.state.fn != self.lightning.trainer.states.TrainerFn.FITTING:
            return
        assert self.lightning_module is not None
        # Every rank unpickled the same module, but user code (a random init in setup) may have diverged.
        state = self.lightning_module.state_dict()
        tensors = {f"raylane.weights.{name}": value for name, value in state.items() if isinstance(value, Tensor)}
        hvd.broadcast_parameters(tensors, root_rank=0)
        for index, optimizer in enumerate(self.optimizers):
            _broadcast_optimizer_state(optimizer, name=f"raylane.optimizer{index}")
        self._horovod_optimizers = [
            self._distributed_optimizer(index, optimizer, trainer.accumulate_grad_batches)
            for index, optimizer in enumerate(self.optimizers)
        ]
        # LR schedulers keep the optimizers configure_optimizers returned: Horovod builds each wrapper from its
        # optimizer's param_groups (the same dicts), so the schedule reaches the wrapper that steps. Torch cannot see
        # those steps and would warn that the scheduler stepped first.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self.optimizers = list(self._horovod_optimizers)

    def _distributed_optimizer(self, index: int, optimizer: Optimizer, backward_passes: int) -> Optimizer:
        settings = self.optimizer_settings
        assert self.lightning_module is not None
        return hvd.DistributedOptimizer(  # type: ignore[no-any-return]
            optimizer,
            named_parameters=_named_parameters(self.lightning_module, index, optimizer),
            compression=hvd.Compression.fp16 if settings.compression == "fp16" else hvd.Compression.none,
            backward_passes_per_step=backward_passes,
            op=hvd.Sum if settings.op == "sum" else hvd.Average,
            gradient_predivide_factor=settings.gradient_predivide_factor,
            sparse_as_dense=settings.sparse_as_dense,
        )

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        # Lightning enters this for the backward passes that accumulate; the step after them synchronises.
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = False

    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        for optimizer in self._horovod_optimizers:
            # Inside an accumulation window Horovod's hooks hold the allreduce back until the last backward pass.
            # With one pass per step (manual optimization, or toggle_model(sync_grad=False)) a second backward before
            # synchronising would trip Horovod's "gradients computed more than backward_passes_per_step" check.
            if not (self._accumulating and optimizer.backward_passes_per_step > 1):  # type: ignore[attr-defined]
                optimizer.synchronize()  # type: ignore[attr-defined]

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if not any(optimizer is wrapped for wrapped in self._horovod_optimizers):
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            return super().optimizer_step(optimizer, closure, model, **kwargs)

    def teardown(self) -> None:
        self._horovod_optimizers = []
        super().teardown()

    # -- collectives --------------------------------------------------------------------------------------------------

    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean") -> Any:
        """Horovod allreduce; ``mean`` (Lightning's default, used by ``self.log(..., sync_dist=True)``) averages."""
        if not isinstance(tensor, Tensor):
            return tensor
        if group is not None:
            raise ValueError("The horovod backend reduces over all workers only; process groups are not supported.")
        op = _horovod_op(reduce_op)
        with _outside_inference_mode():
            tensor = tensor.clone()
            if op is hvd.Average and not torch.is_floating_point(tensor):
                tensor = tensor.to(torch.get_default_dtype())
            return hvd.allreduce(tensor, op=op)

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Every worker's ``tensor``, stacked along a new first dimension (as Lightning's DDP strategy returns it)."""
        if group is not None:
            raise ValueError("The horovod backend gathers over all workers only; process groups are not supported.")
        with _outside_inference_mode(), torch.set_grad_enabled(sync_grads and torch.is_grad_enabled()):
            return hvd.allgather(tensor.unsqueeze(0))  # type: ignore[no-any-return]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not hvd.is_initialized():
            return obj
        # An explicit name: Horovod's default is the object's type, which differs on ranks that pass a placeholder.
        with _outside_inference_mode():
            return hvd.broadcast_object(obj, root_rank=src, name=BROADCAST_NAME)

    def barrier(self, name: str | None = None) -> None:
        if hvd.is_initialized():
            hvd.barrier()


@contextmanager
def _outside_inference_mode() -> Generator[None, None, None]:
    """Lightning validates and tests under ``torch.inference_mode``. Horovod fills its output tensors from its own
    background thread, where writing into a tensor made in inference mode is an error, so collectives make theirs
    outside it (clones of inference-mode inputs are ordinary tensors)."""
    with torch.inference_mode(False):
        yield


def _horovod_op(reduce_op: ReduceOp | str | None) -> Any:
    name = "mean" if reduce_op is None else reduce_op
    if not isinstance(name, str):
        matches = (alias for member, alias in TORCH_REDUCE_OPS.items() if reduce_op == getattr(ReduceOp, member, None))
        name = next(matches, repr(reduce_op))
    if name.lower() not in REDUCE_OPS:
        raise ValueError(f"reduce_op={reduce_op!r} is not supported; use one of {', '.join(REDUCE_OPS)}.")
    return getattr(hvd, REDUCE_OPS[name.lower()])


def _named_parameters(module: nn.Module, index: int, optimizer: Optimizer) -> list[tuple[str, Tensor]]:
    """Names for the allreduce of each of the optimizer's parameters (Horovod matches tensors across ranks by name).

    Parameters the module does not own (an optimizer over extra tensors) get positional names, the same on every rank.
    """
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    named = []
    for group_index, group in enumerate(optimizer.param_groups):
        for position, parameter in enumerate(group["params"]):
            fallback = f"optimizer{index}.group{group_index}.param{position}"
            named.append((names.get(id(parameter), fallback), parameter))
    return named


def _broadcast_optimizer_state(optimizer: Optimizer, name: str) -> None:
    """Give every rank rank 0's optimizer state and hyperparameters.

    ``hvd.broadcast_optimizer_state`` initialises an empty state with a zero-gradient ``step()``, which moves the
    weights under weight decay and starts Adam's step count at 1: a fresh optimizer would no longer match one process.
    Sending the state dict as an object has no such side effect.
    """
    state = hvd.broadcast_object(optimizer.state_dict() if hvd.rank() == 0 else None, root_rank=0, name=name)
    if hvd.rank() != 0:
        optimizer.load_state_dict(state)
