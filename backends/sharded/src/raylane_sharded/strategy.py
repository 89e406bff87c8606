"""``RayShardedStrategy``: Lightning's DDPStrategy with sharded optimizers, launched on raylane's Ray workers.

Lightning 2 removed its FairScale strategies, so this one carries the sharding itself, through public Lightning hooks
only: ``setup_optimizers`` replaces each configured optimizer with its sharded twin (and, for FairScale, wraps the
module in ShardedDataParallel, which needs those optimizers; the zero engine keeps Lightning's own DDP wrapping in
``configure_ddp``), and checkpoints go through Lightning's ``optimizer_state``, which consolidates a sharded
optimizer's state on rank 0 (a collective every rank joins) into an ordinary torch optimizer state dict.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from raylane.errors import advise_on_unused_parameters
from raylane.strategy import RayClusterEnvironment, RayStrategyMixin
from raylane_sharded.engines import ShardingEngine, resolve_engine
from raylane_sharded.optimizers import has_parameters, share_param_groups

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch.optim import Optimizer


class RayShardedStrategy(RayStrategyMixin, lightning_base="DDPStrategy"):
    """Optimizer state (and with FairScale, gradients) sharded across ``workers`` Ray actors.

    Build it with ``get_strategy("sharded", workers=N, engine="fairscale" | "zero", ...)``.
    """

    backend_name: ClassVar[str] = "sharded"
    strategy_name = "ray_sharded"

    def __init__(self, workers: int = 2, **options: Any) -> None:
        sharded_options = self.init_ray_options({"workers": workers, **options})
        self.engine_spec = resolve_engine(sharded_options)
        self.engine_options = {name: value for name, value in sharded_options.items() if name != "engine"}
        self._engine: ShardingEngine | None = None
        # The optimizers configure_optimizers returned, whose param_groups the LR schedulers keep adjusting.
        self._configured_optimizers: list[Optimizer] = []
        super().__init__(
            cluster_environment=RayClusterEnvironment(),
            timeout=timedelta(seconds=self.launch_options.collective_timeout),
            **self.engine_spec.ddp_kwargs(self.engine_options),
        )

    @property
    def engine(self) -> ShardingEngine:
        """The engine, imported and built on first use (inside the workers; the driver never imports it)."""
        if self._engine is None:
            self._engine = self.engine_spec.build(self.engine_options)
        return self._engine

    def __getstate__(self) -> dict[str, Any]:
        # A built engine and the configured optimizers belong to the process that made them; a copy rebuilds its own.
        return {**super().__getstate__(), "_engine": None, "_configured_optimizers": []}

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        # FairScale's ShardedDataParallel cannot skip parameters; the zero engine's DDP can.
        remedy = "get_strategy('sharded', workers=..., engine='zero', find_unused_parameters=True)"
        advise_on_unused_parameters(exception, remedy)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == self.lightning.trainer.states.TrainerFn.FITTING:
            self._route_norm_clipping()

    def configure_ddp(self) -> None:
        if self.engine.wraps_module_itself:
            return  # setup_optimizers wraps it, once the sharded optimizers it needs exist
        super().configure_ddp()

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if trainer.state.fn != self.lightning.trainer.states.TrainerFn.FITTING:
            return
        self._configured_optimizers = list(self.optimizers)
        sharded = [
            self.engine.shard_optimizer(optimizer) if has_parameters(optimizer) else optimizer
            for optimizer in self._configured_optimizers
        ]
        for configured, shard in zip(self._configured_optimizers, sharded):
            share_param_groups(configured, shard)
        self.optimizers = sharded
        if self.engine.wraps_module_itself:
            assert self.model is not None
            self.model = self.engine.wrap_module(self.model, sharded)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # A consolidated state dict is an ordinary torch one (from any number of workers, or from a plain run):
        # each sharded optimizer keeps the part its rank owns.
        super().load_optimizer_state_dict(checkpoint)
        for configured, shard in zip(self._configured_optimizers, self.optimizers):
            share_param_groups(configured, shard)

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        no_sync = self.engine.no_sync(self.model) if self.model is not None else None
        if no_sync is None:
            with super().block_backward_sync():
                yield
        else:
            with no_sync:
                yield

    def teardown(self) -> None:
        if self._engine is not None and self.model is not None and self._engine.unwrap(self.model) is not None:
            self.model = self.lightning_module
        super().teardown()

    def _route_norm_clipping(self) -> None:
        """Send Lightning's clip-by-norm to the engine when a rank holds only its shard of the gradients.

        Lightning clips through the precision plugin, with no strategy hook in between, so this wraps that plugin's
        ``clip_grad_by_norm`` on this worker's copy of the strategy.
        """
        plugin = self.precision_plugin
        lightning_clip = plugin.clip_grad_by_norm
        engine = self.engine

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
            if not engine.clip_grad_norm(getattr(optimizer, "optimizer", optimizer), clip_val):
                lightning_clip(optimizer, clip_val)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
