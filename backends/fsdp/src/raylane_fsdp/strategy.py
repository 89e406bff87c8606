"""``RayFSDPStrategy``: Lightning's ModelParallelStrategy (FSDP2 and tensor parallelism) on raylane's Ray workers.

What changes from Lightning's class: the ranks, device and process group are raylane's (the group is joined in the
backend's ``raylane_setup_process_group`` hook, over gloo on CPU workers, which Lightning's FSDP1 strategy refuses);
a LightningModule without ``configure_model`` is sharded automatically (:mod:`raylane_fsdp.sharding`); the sampler
splits the data across the data-parallel ranks only (the ranks of one tensor-parallel group see the same batches);
the driver receives the full, unsharded weights, gathered to rank 0's CPU one parameter at a time; and checkpoint URLs
pass through node-local staging (:mod:`raylane.staged_checkpoints`), as Lightning's class saves through local paths.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from raylane import _lightning, worker_only_weights
from raylane.errors import ConfigurationError
from raylane.staged_checkpoints import StagedURLCheckpoints
from raylane.strategy import RayClusterEnvironment, RayStrategyMixin
from raylane_fsdp.options import FSDPConfig, parse_options
from raylane_fsdp.sharding import describe_missing, is_sharded, materialize, missing_module_names, shard_model

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

    from raylane.context import WorkerContext


class RayFSDPStrategy(StagedURLCheckpoints, RayStrategyMixin, lightning_base="ModelParallelStrategy"):
    """Parameters, gradients and optimizer state sharded across ``workers`` Ray actors (torch FSDP2), optionally with
    tensor parallelism. Build it with ``get_strategy("fsdp", workers=N, ...)``."""

    backend_name: ClassVar[str] = "fsdp"
    strategy_name = "ray_fsdp"
    learning_rate_search_refusal: ClassVar[str | None] = (
        "the search saves the model and optimizer and restores them afterwards, and Lightning's ModelParallelStrategy "
        "cannot load them back into the optimizer the search changed (a sharded checkpoint: 'Missing key in "
        "checkpoint state_dict: optimizer_0.param_groups.0.initial_lr'; a full one: IndexError)."
    )

    def __init__(self, workers: int = 2, **options: Any) -> None:
        fsdp_options = self.init_ray_options({"workers": workers, **options})
        self.fsdp_config: FSDPConfig = parse_options(
            fsdp_options, self.launch_options.workers, self.launch_options.use_gpu
        )
        # The workers receive the options before they can import the user's modules: module classes go as names.
        for option in ("wrap_modules", "activation_checkpointing"):
            if option in self.backend_options:
                self.backend_options[option] = getattr(self.fsdp_config, option)
        if self.fsdp_config.process_group_backend == "nccl" and self.launch_options.gpus < 1:
            raise ConfigurationError(
                f"gpus_per_worker={self.launch_options.gpus:g} puts several workers on one GPU, and NCCL refuses two "
                "ranks on one device. Pass process_group_backend='gloo' to share GPUs, or whole GPUs per worker."
            )
        if self.fsdp_config.cpu_offload and not self.launch_options.use_gpu:
            warnings.warn(
                "cpu_offload=True on CPU workers changes nothing: their parameters and optimizer state are already in "
                "CPU memory. It moves them off the GPU on use_gpu=True workers.",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(
            data_parallel_size=self.fsdp_config.data_parallel,
            tensor_parallel_size=self.fsdp_config.tensor_parallel,
            save_distributed_checkpoint=self.fsdp_config.state_dict_type == "sharded",
            process_group_backend=self.fsdp_config.process_group_backend,
            timeout=timedelta(seconds=self.launch_options.collective_timeout),
        )
        # Lightning's ModelParallelStrategy takes no cluster_environment argument; the attribute is ParallelStrategy's.
        self.cluster_environment = RayClusterEnvironment()
        self._shard_mesh: DeviceMesh | None = None
        self._predict_batches: dict[str, Any] = {}
        self._gathered_units: list[Any] = []  # FSDP units unsharded for a streamed predict

    def __getstate__(self) -> dict[str, Any]:
        # Meshes hold this process's process groups; a copy (the next entry point's payload) builds its own.
        return {
            **super().__getstate__(),
            "_shard_mesh": None,
            "_device_mesh": None,
            "_predict_batches": {},
            "_gathered_units": [],
        }

    # -- driver --------------------------------------------------------------------------------------------------

    def check_before_launch(self, trainer: pl.Trainer) -> None:
        """Module classes named in the options must exist in the model (known here unless configure_model adds them)."""
        module = trainer.lightning_module
        if module is not None and not self._configures_model(module):
            self._check_named_modules(module)

    # -- worker --------------------------------------------------------------------------------------------------

    def adopt_worker_context(self, context: WorkerContext) -> None:
        super().adopt_worker_context(context)
        if context.world_size != self.fsdp_config.workers:  # an elastic run (workers=(min, max)) on another count
            self.fsdp_config = dataclasses.replace(self.fsdp_config, workers=context.world_size)
            _lightning.set_data_parallel_size(self, self.fsdp_config.data_parallel)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # The ranks of one tensor-parallel group compute on the same samples; data is split across groups only.
        tensor_parallel = self.fsdp_config.tensor_parallel
        return {
            "num_replicas": max(1, self.ray_environment.world_size() // tensor_parallel),
            "rank": self.ray_environment.global_rank() // tensor_parallel,
        }

    @property
    def shard_mesh(self) -> DeviceMesh:
        """The mesh automatic sharding uses: the data-parallel dimension, or (replicate, shard) with hybrid sharding."""
        if self._shard_mesh is None:
            self._shard_mesh = self._build_shard_mesh()
        return self._shard_mesh

    def setup(self, trainer: pl.Trainer) -> None:
        # Lightning's ModelParallelStrategy.setup, except that a module without configure_model is sharded here
        # instead of rejected, and the model stays on the CPU when it is offloaded there.
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if not is_sharded(self.model):
            self._check_named_modules(self.model)
            manual = not self.lightning_module.automatic_optimization
            shard_model(self.model, self.fsdp_config, self.shard_mesh, self.root_device.type == "cuda", manual)
        offloaded = self.fsdp_config.cpu_offload  # offloaded shards live in CPU memory
        materialized = materialize(self.model, torch.device("cpu") if offloaded else self.root_device)
        weights = worker_only_weights.kept(self.lightning_module)
        if materialized and weights:  # layers configure_model built on the meta device have memory only now
            self.load_weights_from_driver(weights)
        self.model = self.precision_plugin.convert_module(self.model)
        if not self.fsdp_config.cpu_offload:
            self.model_to_device()
        self.barrier()
        if trainer.state.fn == self.lightning.trainer.states.TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().training_step(*args, **kwargs)
        except RuntimeError as error:
            if "mixed torch.Tensor and DTensor" not in str(error) or self.lightning_module.automatic_optimization:
                raise
            raise ConfigurationError(
                "training_step computed with parameters FSDP had not gathered. Under manual optimization the fsdp "
                "backend gathers a unit's parameters only around that unit's own forward: every submodule that holds "
                "parameters is (or is inside) a unit, so call layers as modules (self.generator(z)), and call a "
                "layer inside a wrap_modules unit through that unit. Parameters the LightningModule registers on "
                "itself are gathered by its own forward only: use them in forward() and call self(...)."
            ) from error

    @property
    def reports_predictions(self) -> bool:
        # The ranks of one tensor-parallel group predict the same samples: the first of each group reports them.
        return self.ray_environment.global_rank() % self.fsdp_config.tensor_parallel == 0

    def on_predict_start(self) -> None:
        """Agree on the most predict batches any rank has, per dataloader.

        Lightning deals predict samples to the ranks without padding, so one rank may get a batch fewer; but every
        forward all-gathers parameters across the ranks, so a rank that stopped early would leave the others waiting.
        A rank with fewer batches repeats its last one right after it (the output discarded) until the counts match,
        before any other collective.
        """
        import torch.distributed as dist

        super().on_predict_start()
        counts = self.lightning_module.trainer.num_predict_batches
        if not all(math.isfinite(n) for n in counts):
            self._gather_for_streamed_predictions()
            return
        self._gather_around_predict_step()
        mine = [int(n) for n in counts]
        most = torch.tensor(mine, dtype=torch.int64, device=self.root_device)
        if dist.is_initialized():
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
        self._predict_batches = {"mine": mine, "most": most.tolist(), "done": [0] * len(mine)}
        for index, (count, largest) in enumerate(zip(mine, self._predict_batches["most"])):
            if count == 0 and largest > 0:
                raise ConfigurationError(
                    f"predict dataloader {index} gives rank {self.global_rank} no batch while other ranks get "
                    f"{largest}: FSDP's forward is a collective, so every rank needs at least one batch. Predict at "
                    "least as many samples as there are data-parallel workers, or with fewer workers."
                )

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        output = _completed(super().predict_step(*args, **kwargs))
        batches = self._predict_batches
        index = kwargs.get("dataloader_idx", args[2] if len(args) > 2 else 0)
        if batches and index < len(batches["done"]):
            batches["done"][index] += 1
            if batches["done"][index] == batches["mine"][index]:  # this rank's last batch of this dataloader
                with torch.no_grad():
                    for _ in range(batches["most"][index] - batches["mine"][index]):
                        super().predict_step(*args, **kwargs)
        return output

    def on_predict_end(self) -> None:
        self._predict_batches = {}
        if self.model is not None:
            vars(self.model).pop("predict_step", None)  # the wrapper of _gather_around_predict_step
        if self._gathered_units:
            for unit in self._gathered_units:
                unit.reshard()
            self._gathered_units[0].set_reshard_after_forward(self.fsdp_config.reshard_after_forward)  # the root
            self._gathered_units = []
        super().on_predict_end()

    def _gather_around_predict_step(self) -> None:
        """Make ``predict_step`` gather the root unit's parameters as ``forward`` does, so a predict_step that calls
        layers directly (``self.net(x)``, not ``self(x)``) computes with whole weights instead of failing on (or
        mixing in) this rank's shards. Every rank runs the same number of predict steps here (see above), so the
        all-gather this adds is matched on every rank. Streamed predict data takes the other path: the whole model is
        gathered once, and nothing needs gathering per step."""
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if isinstance(self.model, FSDPModule) and "predict_step" not in vars(self.model):
            register_fsdp_forward_method(self.model, "predict_step")

    def _gather_for_streamed_predictions(self) -> None:
        """Streamed predict data (no length: Ray Data, iterable datasets) may give the ranks different numbers of
        batches, which no rank knows in advance. Every rank then gathers the whole model once, together, and predicts
        without collectives: each holds the full weights until predict ends."""
        from torch.distributed.fsdp import FSDPModule

        if self.fsdp_config.tensor_parallel > 1:
            raise ConfigurationError(
                "predict data without a length (a streamed or iterable dataset) can give the ranks different numbers "
                "of batches, and tensor-parallel layers compute together in every forward. Predict with a dataloader "
                "that has a length, or with tensor_parallel=1."
            )
        assert self.model is not None
        self._gathered_units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        if self._gathered_units:
            self._gathered_units[0].set_reshard_after_forward(False)  # the root; recurses into every unit
            for unit in self._gathered_units:
                unit.unshard()

    def state_dict_for_driver(self) -> dict[str, Any]:
        """The full weights on rank 0's CPU (empty on the other ranks): every rank takes part in gathering them, one
        parameter at a time, so no rank holds more than one full copy."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _configures_model(self, module: pl.LightningModule) -> bool:
        assert self.lightning is not None
        return type(module).configure_model is not self.lightning.LightningModule.configure_model

    def _check_named_modules(self, module: nn.Module) -> None:
        for option in ("wrap_modules", "activation_checkpointing"):
            missing = missing_module_names(module, getattr(self.fsdp_config, option))
            if missing:
                raise ConfigurationError(describe_missing(module, option, missing))

    def _build_shard_mesh(self) -> DeviceMesh:
        config = self.fsdp_config
        if config.hybrid_shard is False:
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        context = self.worker_context
        local_world_size = context.ranks.local_world_size if context is not None else config.workers
        shard = config.shard_group_size(local_world_size)
        if config.hybrid_shard is True and context is not None:
            # The mesh takes shard groups from consecutive ranks: they stay inside a node only if its ranks are.
            ranks = context.ranks
            if ranks.local_world_size * ranks.num_nodes != ranks.world_size or (
                ranks.global_rank // ranks.local_world_size != ranks.node_rank
            ):
                raise ConfigurationError(
                    f"hybrid_shard=True needs the same number of workers on every node, with consecutive ranks; rank "
                    f"{ranks.global_rank} is one of {ranks.local_world_size} workers on node {ranks.node_rank} of "
                    f"{ranks.num_nodes} (world size {ranks.world_size}). Use placement_strategy='PACK' or "
                    "'STRICT_PACK' with workers a multiple of the nodes, or pass hybrid_shard=<shard-group size>."
                )
        if config.data_parallel % shard:
            raise ConfigurationError(
                f"hybrid_shard=True shards inside each node, but {local_world_size} workers per node with "
                f"tensor_parallel={config.tensor_parallel} do not divide the {config.data_parallel} data-parallel "
                "ranks evenly. Give every node the same number of workers, or pass hybrid_shard=<shard-group size>."
            )
        mesh = init_device_mesh(
            self.root_device.type,
            (config.data_parallel // shard, shard, config.tensor_parallel),
            mesh_dim_names=("replicate", "shard", "tensor_parallel"),
        )
        return mesh["replicate", "shard"]


def _completed(output: Any) -> Any:
    """``output`` with every tensor's pending collective finished. A tensor-parallel layer (``RowwiseParallel``)
    returns its all-reduced output as an asynchronous tensor that finishes on first use; a prediction is not used on
    the worker, so without this it could leave with the rank's partial sum (seen on the last batch of a predict)."""
    from lightning_utilities.core.apply_func import apply_to_collection
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return apply_to_collection(output, AsyncCollectiveTensor, lambda tensor: tensor.wait())
