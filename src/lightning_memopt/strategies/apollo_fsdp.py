"""``apollo_fsdp``: FSDP2 for Lightning, sharded per transformer block, made for APOLLO.

Lightning's ``FSDPStrategy`` is FSDP1: it flattens parameters into 1-D shards (a matrix
optimizer such as APOLLO cannot work on them) and refuses the CPU. This strategy uses FSDP2
(``torch.distributed.fsdp.fully_shard``): every parameter stays a DTensor with its global 2-D
shape, split by rows, and :class:`~lightning_memopt.optim.APOLLO` steps on those shards with
the same math as on one device (:mod:`lightning_memopt.optim.sharding`), its state split
across ranks too. It extends Lightning's ``ModelParallelStrategy`` (device mesh, distributed
checkpoints with ``torch.distributed.checkpoint``) and drops its one demand: the model is
sharded automatically, one FSDP unit per transformer block, then the root, unless the
LightningModule's ``configure_model`` already applied ``fully_shard`` itself.

Example:
    >>> import lightning_memopt  # registers "apollo_fsdp" and its variants
    >>> from lightning.pytorch import Trainer
    >>> trainer = Trainer(strategy="apollo_fsdp", accelerator="cpu", devices=2)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
from lightning.fabric.strategies.model_parallel import _has_dtensor_modules, _is_sharded_checkpoint
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_memopt.layers.blocks import find_transformer_blocks
from lightning_memopt.layers.checkpointing import apply_activation_checkpointing

# The module, not its names: importing atomic imports Lightning, whose import registers this
# strategy, which then finds atomic partially initialized.
from . import atomic

# Lightning precision flags that FSDP2 handles here (those of ModelParallelStrategy).
SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true", "16-true")
# The LightningModule methods that run a forward pass: FSDP2 all-gathers the root's own
# parameters around them (it knows only ``forward`` by default).
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_BACKENDS = {"cpu": ("gloo",), "cuda": ("nccl", "cuda:nccl", "cpu:gloo,cuda:nccl")}
# Registry name -> (description, init arguments).
STRATEGY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "apollo_fsdp": ("FSDP2, sharded per transformer block, with shard-aware APOLLO", {}),
    "apollo_fsdp_cpu_offload": (
        "apollo_fsdp with parameters, gradients and optimizer steps offloaded to the CPU (CUDA only)",
        {"cpu_offload": True},
    ),
    "apollo_fsdp_activation_checkpointing": (
        "apollo_fsdp with activation checkpointing of every transformer block",
        {"activation_checkpointing": True},
    ),
    "apollo_fsdp_bf16": (
        "apollo_fsdp computing in bfloat16 (FSDP2 mixed precision), reducing gradients in float32",
        {"param_dtype": "bfloat16", "reduce_dtype": "float32"},
    ),
    "apollo_hsdp": (
        "HSDP: apollo_fsdp sharded within each node and replicated across nodes (a 2-D device mesh)",
        {"sharding_strategy": "HYBRID_SHARD"},
    ),
}
# Lightning FSDPStrategy's sharding_strategy values that FSDP2 here implements.
SHARDING_STRATEGIES = ("FULL_SHARD", "HYBRID_SHARD")
# The other values of Lightning's (and torch's ShardingStrategy), and what to use instead.
_OTHER_SHARDING = {
    "SHARD_GRAD_OP": "ApolloFSDPStrategy(reshard_after_forward=False) (FSDP2's equivalent: parameters stay "
    "gathered between forward and backward)",
    "NO_SHARD": "strategy='ddp' (no sharding is plain data parallelism)",
    "_HYBRID_SHARD_ZERO2": "sharding_strategy='HYBRID_SHARD' with reshard_after_forward=False",
}


def _as_dtype(value: str | torch.dtype | None, name: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = _DTYPES.get(str(value).lower().removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"ApolloFSDPStrategy: {name}={value!r} is not a dtype; use one of {sorted(_DTYPES)}.")
    return dtype


def _as_sharding_strategy(value: Any) -> str:
    """``value`` (a name, any case, or torch's ``ShardingStrategy`` enum) as one of :data:`SHARDING_STRATEGIES`."""
    name = getattr(value, "name", value)  # torch.distributed.fsdp.ShardingStrategy.HYBRID_SHARD -> its name
    if isinstance(name, str) and name.upper() in SHARDING_STRATEGIES:
        return name.upper()
    hint = _OTHER_SHARDING.get(name.upper()) if isinstance(name, str) else None
    raise ValueError(
        f"ApolloFSDPStrategy: sharding_strategy={value!r} is not supported; use 'FULL_SHARD' (shard over every "
        "rank, the default) or 'HYBRID_SHARD' (shard within a node, replicate across nodes: strategy='apollo_hsdp')"
        + (f". For {name} use {hint}." if hint else ".")
    )


def _check_mesh_argument(device_mesh: Any, sharding_strategy: str) -> tuple[int, int] | Any:
    """Validate ``device_mesh``: ``None``, a ``(replicas, shard_size)`` pair, or a 2-D ``DeviceMesh``."""
    if device_mesh is None:
        return None
    if sharding_strategy != "HYBRID_SHARD":
        raise ValueError(
            f"ApolloFSDPStrategy: device_mesh={device_mesh!r} is only valid with sharding_strategy='HYBRID_SHARD' "
            "(as in Lightning's FSDPStrategy); 'FULL_SHARD' shards over every rank. Pass "
            "sharding_strategy='HYBRID_SHARD' (or strategy='apollo_hsdp'), or drop device_mesh."
        )
    if hasattr(device_mesh, "mesh_dim_names"):  # a DeviceMesh
        if device_mesh.ndim != 2:
            raise ValueError(
                f"ApolloFSDPStrategy: device_mesh has {device_mesh.ndim} dimension(s) {tuple(device_mesh.shape)}; "
                "HYBRID_SHARD needs a 2-D mesh (replicate, shard), e.g. init_device_mesh('cuda', (nodes, "
                "gpus_per_node), mesh_dim_names=('replicate', 'shard')), or pass the pair (replicas, shard_size)."
            )
        return device_mesh
    shape = tuple(device_mesh) if isinstance(device_mesh, (tuple, list)) else None
    if shape is None or len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"ApolloFSDPStrategy: device_mesh={device_mesh!r}; give (replicas, shard_size), two positive integers "
            "whose product is the world size, e.g. (2, 8) for 2 nodes of 8 GPUs (shard within a node), or a 2-D "
            "DeviceMesh."
        )
    return shape


def _refuse_int8(model: nn.Module | None) -> None:
    """INT8 weights (``Int8Weight``) are trained on one device; FSDP2 cannot shard them."""
    if model is None:
        return
    from lightning_memopt.quant.int8 import Int8Weight

    names = [name for name, p in model.named_parameters() if isinstance(p, Int8Weight)]
    if names:
        raise ValueError(
            f"apollo_fsdp: {len(names)} parameters are INT8 weights (e.g. {names[0]!r}), which FSDP2 cannot shard "
            "(full, or hybrid within a node): the INT8 tensor with its group scales is not a DTensor. Train INT8 "
            "weights on one device (strategy='auto', devices=1), or shard the model in full precision without the "
            "INT8 conversion (APOLLO's optimizer state is sharded either way)."
        )


def _checkpoint(module: nn.Module, blocks: list[nn.Module], option: bool | str) -> None:
    """Activation-checkpoint ``blocks`` (``option``: ``True`` for ``"full"``, or a policy name)."""
    if option and blocks:
        apply_activation_checkpointing(module, policy="full" if option is True else option, blocks=blocks)


def shard_module(
    module: nn.Module,
    mesh: Any,
    block_classes: Iterable[type[nn.Module] | str] | None = None,
    *,
    mp_policy: Any = None,
    offload_policy: Any = None,
    reshard_after_forward: bool | int = True,
    activation_checkpointing: bool | str = False,
    forward_methods: Sequence[str] = (),
) -> list[nn.Module]:
    """Apply FSDP2 to ``module``: one unit per transformer block, then the root.

    Blocks come from :func:`~lightning_memopt.layers.blocks.find_transformer_blocks`
    (``block_classes``: classes or class names; default: detected). A model without
    repeated blocks is sharded as one unit, with a warning (it all-gathers the whole model
    at once). ``forward_methods`` names methods other than ``forward`` that run the model
    (a LightningModule's ``training_step`` ...): FSDP2 gathers the root's parameters around
    them. ``activation_checkpointing``: ``True`` (``"full"``) or a policy name of
    :func:`~lightning_memopt.layers.checkpointing.apply_activation_checkpointing`
    (``"selective"``); blocks already checkpointed are left alone. Returns the blocks.

    Example (inside a process group):
        >>> # from torch.distributed.device_mesh import init_device_mesh
        >>> # shard_module(model, init_device_mesh("cpu", (2,)))
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    blocks = find_transformer_blocks(module, block_classes)
    if not blocks:
        warnings.warn(
            f"apollo_fsdp: found no repeated transformer block in {type(module).__name__}, so the whole model is "
            "one FSDP unit: its parameters are sharded, but every forward gathers all of them at once. Pass "
            "ApolloFSDPStrategy(block_classes=[...]) with the class (or class name) of your layers to shard per layer.",
            UserWarning,
            stacklevel=2,
        )
    _checkpoint(module, blocks, activation_checkpointing)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    for name in forward_methods:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)
    return blocks


def check_optimizers(optimizers: Sequence[torch.optim.Optimizer], model: nn.Module, built_by_cli: bool = False) -> None:
    """Refuse optimizers that cannot train the sharded ``model``, with what to do instead.

    - bitsandbytes' 8-bit optimizers step with kernels that take plain tensors, not DTensors.
    - An optimizer built before sharding (LightningCLI's automatic ``optimizer:`` key, or one
      made in ``__init__``) holds the replaced, unsharded parameters and would train nothing.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> check_optimizers([torch.optim.AdamW(model.parameters())], model)
    """
    model_params = {id(p) for p in model.parameters()}
    for optimizer in optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)  # LayerwiseOptimizer and similar wrappers
        for opt in {id(optimizer): optimizer, id(inner): inner}.values():
            if type(opt).__module__.split(".")[0] == "bitsandbytes":
                raise TypeError(
                    f"apollo_fsdp: {type(opt).__name__} (bitsandbytes) cannot step on FSDP2's sharded parameters: its "
                    "8-bit kernels take plain tensors and FSDP2's parameters are DTensors. Use APOLLO or APOLLO-Mini "
                    "(lightning_memopt.optim.APOLLO / APOLLOMini, registry names 'apollo' / 'apollo_mini'), whose "
                    "state is already a small fraction of AdamW's and is sharded too, or torch.optim.AdamW; keep "
                    "8-bit optimizers for single-device or DDP training."
                )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        stale = [p for p in params if id(p) not in model_params]
        if stale:
            where = (
                "LightningCLI's automatic `optimizer:` key builds the optimizer from the model's parameters before "
                "the strategy shards the model"
                if built_by_cli
                else "the optimizer was built before the strategy sharded the model (in __init__, or by a "
                "configuration that instantiates it ahead of training)"
            )
            raise RuntimeError(
                f"apollo_fsdp: {len(stale)} of the {len(params)} parameters in {type(optimizer).__name__} are not "
                f"parameters of the sharded model (e.g. one of shape {tuple(stale[0].shape)}): {where}. FSDP2 replaces "
                "every parameter with a sharded one, so this optimizer would train nothing. Build the optimizer in "
                "configure_optimizers() from self.parameters(): with LightningCLI, give the model an argument "
                "`optimizer: OptimizerCallable = torch.optim.AdamW` (from lightning.pytorch.cli import "
                "OptimizerCallable), set it under `model.init_args.optimizer` instead of the top-level `optimizer:` "
                "key, and return self.optimizer(self.parameters()) from configure_optimizers()."
            )


class ApolloFSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism, sharded per transformer block, for APOLLO (and any torch optimizer).

    Args:
        block_classes: the module classes (or class names) to shard one by one, e.g.
            ``["LlamaDecoderLayer"]``; default: detected (HF's ``_no_split_modules``, else the
            class that fills the longest ``nn.ModuleList``).
        activation_checkpointing: recompute each block's activations in backward: ``True``
            (``"full"``) or ``"selective"`` (keep matmul outputs), through
            :func:`~lightning_memopt.layers.checkpointing.apply_activation_checkpointing`.
            Blocks already checkpointed (the ``ActivationCheckpointing`` callback, transformers'
            ``gradient_checkpointing_enable()``) are left as they are.
        param_dtype, reduce_dtype: FSDP2 mixed precision (``MixedPrecisionPolicy``): the dtype
            of the gathered parameters used in forward/backward, and of the gradient
            reduction (``"bfloat16"``, ``"float32"``, ...). The sharded parameters and the
            optimizer stay in their own dtype.
        cpu_offload: keep sharded parameters, gradients and the optimizer step on the CPU
            (FSDP2 ``CPUOffloadPolicy``; needs a CUDA accelerator).
        reshard_after_forward: FSDP2's option (``True``: free gathered parameters after each
            block's forward and gather again in backward).
        data_parallel_size: ranks that shard the model and split the data; default: all.
            A smaller value leaves ``world_size / data_parallel_size`` ranks per group for
            tensor parallelism, which the LightningModule's own ``configure_model`` applies
            (``self.device_mesh["tensor_parallel"]``).
        sharding_strategy: as in Lightning's ``FSDPStrategy``: ``"FULL_SHARD"`` (default) shards
            parameters, gradients and optimizer state over every rank; ``"HYBRID_SHARD"`` (HSDP,
            ``strategy="apollo_hsdp"``) shards them within groups of ``shard_size`` ranks (a
            node, by default) and replicates across the groups, so only the gradient
            all-reduce crosses the slower links between nodes. APOLLO's collectives then run
            within a group only, and its state is sharded within the group and replicated
            across groups.
        device_mesh: with ``"HYBRID_SHARD"``: ``(replicas, shard_size)``, whose product is the
            world size (Lightning's meaning), or a 2-D ``DeviceMesh``; default
            ``(num_nodes, devices)``: shard within each node, replicate across nodes.
        save_distributed_checkpoint: save a folder of shards with
            ``torch.distributed.checkpoint`` (default; re-shardable) or one full file from rank 0.
            Either is crash-safe: written under ``.tmp-<pid>/name`` and renamed into place once
            complete (:mod:`~lightning_memopt.strategies.atomic`), so a run killed during a
            save resumes from the previous checkpoint.
        process_group_backend, timeout: as in Lightning's ``ModelParallelStrategy``.

    Example:
        >>> strategy = ApolloFSDPStrategy(block_classes=["LlamaDecoderLayer"], activation_checkpointing=True)
        >>> # Trainer(strategy=strategy, accelerator="cuda", devices=8, precision="bf16-mixed")
        >>> hsdp = ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 8))
        >>> # Trainer(strategy=hsdp, accelerator="cuda", num_nodes=2, devices=8)   # or strategy="apollo_hsdp"
    """

    strategy_name = "apollo_fsdp"

    def __init__(
        self,
        block_classes: Sequence[str | type[nn.Module]] | None = None,
        activation_checkpointing: bool | str = False,
        param_dtype: str | torch.dtype | None = None,
        reduce_dtype: str | torch.dtype | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool | int = True,
        data_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        *,
        sharding_strategy: str | Any = "FULL_SHARD",
        device_mesh: tuple[int, int] | Any | None = None,
    ) -> None:
        self.sharding_strategy = _as_sharding_strategy(sharding_strategy)
        self._mesh_argument = _check_mesh_argument(device_mesh, self.sharding_strategy)
        if self.sharding_strategy == "HYBRID_SHARD" and data_parallel_size != "auto":
            raise ValueError(
                f"ApolloFSDPStrategy: data_parallel_size={data_parallel_size!r} with sharding_strategy='HYBRID_SHARD': "
                "hybrid sharding uses every rank for data parallelism (its mesh is device_mesh=(replicas, "
                "shard_size)); leave data_parallel_size='auto', or use 'FULL_SHARD' with tensor parallelism."
            )
        self._fsdp_mesh: Any = None
        if data_parallel_size != "auto" and (
            isinstance(data_parallel_size, bool) or not isinstance(data_parallel_size, int) or data_parallel_size < 1
        ):
            raise ValueError(
                f"ApolloFSDPStrategy: data_parallel_size={data_parallel_size!r}; use 'auto' (all ranks) or a positive "
                "integer that divides the world size."
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size="auto",
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.block_classes = list(block_classes) if block_classes is not None else None
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = _as_dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _as_dtype(reduce_dtype, "reduce_dtype")
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        # Crash-safe single-file saves (save_distributed_checkpoint=False); a CheckpointIO
        # plugin given to the Trainer replaces it.
        self._checkpoint_io = atomic.AtomicCheckpointIO()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Add ``apollo_fsdp`` and its variants (:data:`STRATEGY_VARIANTS`) to ``strategy_registry``.

        Example:
            >>> from lightning.pytorch.strategies import StrategyRegistry
            >>> ApolloFSDPStrategy.register_strategies(StrategyRegistry)
            >>> "apollo_fsdp_cpu_offload" in StrategyRegistry
            True
        """
        for name, (description, init_params) in STRATEGY_VARIANTS.items():
            strategy_registry.register(name, cls, description=description, override=True, **init_params)

    # ------------------------------------------------------------------ validation
    @override
    def _configure_launcher(self) -> None:
        # Called when the Trainer is built, with the accelerator and precision known: the
        # place to refuse a combination before any process starts.
        self._validate_accelerator_and_precision()
        if self.sharding_strategy == "HYBRID_SHARD":
            self.hybrid_mesh_shape(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    def hybrid_mesh_shape(self, world_size: int) -> tuple[int, int]:
        """``(replicas, shard_size)`` of the HSDP mesh for ``world_size`` ranks (``device_mesh``, or
        ``(num_nodes, devices per node)``); a ``ValueError`` naming the fix if it does not fit.

        Example:
            >>> ApolloFSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 2)).hybrid_mesh_shape(4)
            (2, 2)
        """
        mesh = self._mesh_argument
        if mesh is None:
            nodes = max(int(self.num_nodes), 1)
            if world_size % nodes:
                raise ValueError(
                    f"apollo_hsdp: world size {world_size} does not split into num_nodes={nodes} equal nodes; run the "
                    "same number of devices on every node, or pass device_mesh=(replicas, shard_size)."
                )
            return nodes, world_size // nodes
        shape = tuple(mesh.shape) if hasattr(mesh, "mesh_dim_names") else mesh
        replicas, shard_size = shape
        if replicas * shard_size != world_size:
            per_node = world_size // max(int(self.num_nodes), 1)
            raise ValueError(
                f"apollo_hsdp: device_mesh=({replicas}, {shard_size}) holds {replicas * shard_size} ranks, but the run "
                f"has {world_size} (num_nodes={self.num_nodes} x devices={self.num_processes or world_size}). Give a "
                f"(replicas, shard_size) whose product is {world_size}, e.g. ({max(int(self.num_nodes), 1)}, "
                f"{per_node}) to shard within each node, or change devices/num_nodes."
            )
        per_node = self.num_processes or world_size
        if shard_size > per_node or per_node % shard_size:
            warnings.warn(
                f"apollo_hsdp: device_mesh=({replicas}, {shard_size}) puts {shard_size} ranks in a shard group but a "
                f"node has {per_node}, so shard groups span nodes and every all-gather / reduce-scatter crosses the "
                f"links between nodes. A shard_size that divides {per_node} keeps them inside a node.",
                UserWarning,
                stacklevel=2,
            )
        return replicas, shard_size

    @property
    def fsdp_mesh(self) -> Any:
        """The mesh the model is sharded over: the data-parallel mesh (``FULL_SHARD``), or the 2-D
        ``("replicate", "shard")`` mesh (``HYBRID_SHARD``). Available once the processes are set up."""
        if self._fsdp_mesh is not None:
            return self._fsdp_mesh
        return self.device_mesh["data_parallel"]

    @override
    def connect(self, model: Any) -> None:
        _refuse_int8(model)
        super().connect(model)

    def _validate_accelerator_and_precision(self) -> None:
        from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
        from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision

        accelerator = self.accelerator
        if accelerator is not None and not isinstance(accelerator, (CPUAccelerator, CUDAAccelerator)):
            raise ValueError(
                f"apollo_fsdp runs on CPU (gloo) or CUDA GPUs (nccl), not on {type(accelerator).__name__}. "
                "Use Trainer(accelerator='cpu') or Trainer(accelerator='cuda')."
            )
        device_type = "cuda" if isinstance(accelerator, CUDAAccelerator) else "cpu"
        backend = self._process_group_backend
        if backend is not None and backend not in _BACKENDS[device_type]:
            raise ValueError(
                f"apollo_fsdp: process_group_backend={backend!r} cannot run FSDP2 on {device_type}; "
                f"use {' or '.join(repr(b) for b in _BACKENDS[device_type])} (or leave it unset)."
            )
        if self.cpu_offload and device_type != "cuda":
            raise ValueError(
                "apollo_fsdp: cpu_offload=True (apollo_fsdp_cpu_offload) moves parameters between the CPU and a GPU, "
                "so it needs Trainer(accelerator='cuda'); on the CPU the parameters are already in CPU memory: use "
                "strategy='apollo_fsdp'."
            )
        plugin = self._precision_plugin
        if plugin is None:
            return
        precision = getattr(plugin, "precision", None)
        if type(plugin) not in (Precision, MixedPrecision, HalfPrecision) or precision not in SUPPORTED_PRECISION:
            raise ValueError(
                f"apollo_fsdp does not support precision={precision!r} ({type(plugin).__name__}): FSDP2 here runs "
                f"with {', '.join(SUPPORTED_PRECISION)}. For float16 compute use param_dtype='float16' (FSDP2 mixed "
                "precision) with precision='32-true'; '16-mixed' needs a gradient scaler that does not handle "
                "sharded gradients."
            )

    # ------------------------------------------------------------------ environment
    @override
    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        world_size = self.world_size
        data_parallel = world_size if self._data_parallel_size == "auto" else int(self._data_parallel_size)
        if world_size % data_parallel:
            raise ValueError(
                f"apollo_fsdp: data_parallel_size={data_parallel} does not divide the world size {world_size}."
            )
        self._data_parallel_size = data_parallel
        self._tensor_parallel_size = world_size // data_parallel

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.sharding_strategy != "HYBRID_SHARD":
            return
        from torch.distributed.device_mesh import init_device_mesh

        # Checked again here: under torchrun / SLURM the world size comes from the launcher.
        shape = self.hybrid_mesh_shape(self.world_size)
        mesh = self._mesh_argument
        if not hasattr(mesh, "mesh_dim_names"):
            # Row-major ranks: shard groups are consecutive global ranks, i.e. the ranks of one node.
            mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=("replicate", "shard"))
        self._fsdp_mesh = mesh

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Any) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        _refuse_int8(self.model)
        if any(isinstance(module, FullyShardedDataParallel) for module in self.model.modules()):
            raise TypeError(
                "apollo_fsdp: the model contains FSDP1 modules (torch.distributed.fsdp.FullyShardedDataParallel); "
                "this strategy applies FSDP2 (fully_shard) itself. Remove the FSDP1 wrapping."
            )
        if _has_dtensor_modules(self.model):
            # The LightningModule's configure_model parallelized the model: respect it (checkpointing
            # composes with fully_shard in either order).
            if self.activation_checkpointing:
                _checkpoint(
                    self.model, find_transformer_blocks(self.model, self.block_classes), self.activation_checkpointing
                )
        else:
            if self._tensor_parallel_size > 1:
                raise ValueError(
                    f"apollo_fsdp: data_parallel_size={self._data_parallel_size} leaves {self._tensor_parallel_size} "
                    "ranks per tensor-parallel group, but automatic sharding is data-parallel only. Apply tensor "
                    "parallelism in your LightningModule's configure_model() (self.device_mesh['tensor_parallel']), "
                    "or leave data_parallel_size='auto'."
                )
            self._shard(self.model)

        # A model built on the meta device gets its shards now (in CPU memory under CPU offload).
        _materialize_distributed_module(self.model, torch.device("cpu") if self.cpu_offload else self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and not self.cpu_offload:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        mp_policy = None
        if self.param_dtype is not None or self.reduce_dtype is not None:
            mp_policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        shard_module(
            module,
            self.fsdp_mesh,
            self.block_classes,
            mp_policy=mp_policy,
            offload_policy=CPUOffloadPolicy() if self.cpu_offload else None,
            reshard_after_forward=self.reshard_after_forward,
            activation_checkpointing=self.activation_checkpointing,
            # The step methods the LightningModule defines (not the inherited placeholders).
            forward_methods=[name for name in STEP_METHODS if is_overridden(name, module)],
        )

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        if not self.cpu_offload:
            self.model.to(self.root_device)
            return
        # Sharded parameters stay on the CPU (FSDP2 moves them in for compute); buffers go to the GPU.
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.root_device)

    @override
    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        assert self.lightning_module is not None
        configure = getattr(self.lightning_module.configure_optimizers, "func", None)
        built_by_cli = getattr(configure, "__qualname__", "").endswith("LightningCLI.configure_optimizers")
        check_optimizers(self.optimizers, self.lightning_module, built_by_cli=built_by_cli)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save crash-safely: the folder of shards (or the full file) is written into a staging
        folder beside it (``.tmp-<pid>/name``) and renamed into place only once every rank
        has finished."""
        if not self._save_distributed_checkpoint:
            path = Path(self.broadcast(str(filepath)))
            if path.is_dir() and not _is_sharded_checkpoint(path):
                raise IsADirectoryError(
                    f"apollo_fsdp: the checkpoint path {str(path)!r} is a directory that is not a distributed "
                    "checkpoint; choose another file name, or remove the directory."
                )
            # The CheckpointIO (AtomicCheckpointIO) writes on rank 0; a folder of shards saved earlier
            # under this name is replaced by the file atomically.
            super(ModelParallelStrategy, self).save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"ApolloFSDPStrategy.save_checkpoint(..., storage_options={storage_options!r}): a distributed "
                "checkpoint is written by torch.distributed.checkpoint, which takes no storage options. Drop them."
            )
        # Every rank writes into the same temporary folder (rank 0's name), on a shared file system.
        path = Path(self.broadcast(str(filepath)))
        tmp = atomic.staging_path(path, pid=self.broadcast(os.getpid()))
        if self.is_global_zero:
            atomic.recover_interrupted_replace(path)
            atomic.remove_stale_temporaries(path)
            tmp.mkdir(parents=True)  # and its staging folder .tmp-<pid>
        self.barrier("apollo_fsdp_checkpoint_folder")
        converted_state = {"state_dict": checkpoint.pop("state_dict")}
        converted_state.update(
            {f"optimizer_{idx}": state for idx, state in enumerate(checkpoint.pop("optimizer_states", []))}
        )
        _distributed_checkpoint_save(converted_state, tmp)
        if self.is_global_zero:
            torch.save(checkpoint, tmp / _METADATA_FILENAME)
        self.barrier("apollo_fsdp_checkpoint_written")
        if self.is_global_zero:
            atomic.fsync_tree(tmp)
            atomic.atomic_replace(tmp, path)
            atomic.remove_stale_temporaries(path)  # the empty staging folder
        self.barrier("apollo_fsdp_checkpoint_renamed")

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if self.is_global_zero:
            atomic.recover_interrupted_replace(checkpoint_path)
        self.barrier("apollo_fsdp_checkpoint_recovered")
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def register_strategies() -> None:
    """Register ``apollo_fsdp`` and its variants in Lightning's ``StrategyRegistry`` (idempotent).

    ``import lightning_memopt`` calls it (as soon as ``lightning.pytorch`` is imported).

    Example:
        >>> register_strategies()
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> "apollo_fsdp" in StrategyRegistry
        True
    """
    ApolloFSDPStrategy.register_strategies(StrategyRegistry)


# When this module is the first to import Lightning (``from lightning_memopt.strategies import
# ApolloFSDPStrategy`` in a fresh interpreter), the registration hook finds it half-imported and
# leaves the names to this line.
register_strategies()
