"""FSDP2 (``fully_shard``) for the training stages, through Lightning's ``ModelParallelStrategy``.

``FSDP2Strategy`` is ``ModelParallelStrategy`` with a one-dimensional data-parallel mesh over
every rank of every node (no tensor parallelism): each rank trains on its own rows and holds
1/world of the sharded parameters, gradients and Adam moments. ``shard_model`` wraps each
decoder layer (the classes a Hugging Face model lists in ``_no_split_modules``) and then the
root, so one layer's weights are gathered at a time.

Start (``shard_from_rank0``): rank 0 loads the weights; every other rank builds the same modules on the
``meta`` device (no memory), all ranks ``fully_shard``, the others allocate only their shards, and rank 0's
full state dict is broadcast into the shards (``set_model_state_dict(..., broadcast_from_rank0=True)``);
buffers (rotary frequencies, not in the state dict) are broadcast too. So host memory per node is one full
copy (rank 0's) plus a shard per rank, instead of one full copy per rank.

QLoRA + FSDP: bitsandbytes' 4-bit weights carry their quantization state on the parameter
object, which sharding would drop, so they stay replicated (frozen, about 0.56 bytes per
parameter) and everything else -- LoRA weights, embeddings, norms, ``lm_head`` -- is sharded.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from prism_lightning.config import FSDPArgs
from prism_lightning.modeling import torch_dtype, trainable_named_parameters


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with ``data_parallel_size = num_nodes x devices`` and no tensor parallelism.

    Use it as ``trainer.strategy: fsdp2`` (registered below) or with its ``class_path`` and init args;
    checkpoints are sharded (``torch.distributed.checkpoint`` folders) unless
    ``save_distributed_checkpoint: false``.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout_minutes: float = 30.0):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timedelta(minutes=timeout_minutes))

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Resume from a sharded checkpoint that holds only the trainable parameters (``SFTModule`` leaves the
        frozen base out: it is read from the model's files): load those entries of the model's state, then the
        optimizer and the rest, as Lightning does for a full one (it requests every key and fails on the base's)."""
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load, _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        saved = {k.split(".", 1)[1] for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata
                 if k.startswith("state_dict.")}
        module = self.model
        state = {"state_dict": {k: v for k, v in get_model_state_dict(module).items() if k in saved}}
        _distributed_checkpoint_load(state, path)
        module.load_state_dict(state["state_dict"], strict=False)
        for idx, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            _distributed_checkpoint_load(optim_state, path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class a HF model names in ``_no_split_modules``."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layer found to shard (looked for {sorted(names)} "
                         "from _no_split_modules); FSDP needs a transformers causal LM")
    return layers


def quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """bitsandbytes 4-bit weights (``Params4bit``), which stay replicated under FSDP."""
    return {p for p in model.parameters() if type(p).__name__ == "Params4bit"}


def shard_model(model: nn.Module, mesh, args: FSDPArgs) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root, over the data-parallel ``mesh`` (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if "tensor_parallel" in (mesh.mesh_dim_names or ()):
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError("prism_lightning shards with FSDP only: use trainer.strategy "
                             "prism_lightning.sharding.FSDP2Strategy (or tensor_parallel_size: 1)")
        mesh = mesh["data_parallel"]
    mp = MixedPrecisionPolicy(param_dtype=torch_dtype(args.param_dtype) if args.param_dtype else None,
                              reduce_dtype=torch_dtype(args.reduce_dtype) if args.reduce_dtype else None)
    ignored = quantized_params(model)
    if mesh.device_type != "cpu" and any(p.device.type == "cpu" for p in ignored):  # fully_shard won't move them
        raise ValueError("QLoRA + FSDP: the 4-bit base must be loaded on the GPU (device_map)")
    kwargs = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=args.reshard_after_forward,
                  ignored_params=ignored or None)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "generate"):  # generate() bypasses the root's forward: gather its weights for it too
        register_fsdp_forward_method(model, "generate")
    return model


def shard_from_rank0(build, mesh, args: FSDPArgs) -> nn.Module:
    """The model ``build(empty)`` makes, sharded over ``mesh`` with rank 0's weights (module docstring).

    ``build(empty: bool)`` returns the model with its weights (rank 0) or the same modules on ``meta``.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    model = build(rank != 0)
    first: dict[int, int] = {}  # parameter sharing as the position of each tensor's first name, comparable
    mine = [(n, tuple(p.shape), first.setdefault(id(p), k))
            for k, (n, p) in enumerate(model.named_parameters(remove_duplicate=False))]
    theirs = [mine]
    dist.broadcast_object_list(theirs, src=0)
    if theirs[0] != mine:
        diff = sorted(set(theirs[0]) ^ set(mine))[:3]
        raise RuntimeError(f"rank {rank} built another model than rank 0 from its config (first differences: {diff}); "
                           "set fsdp.load_on_rank0: false so that every rank loads the weights")
    full = model.state_dict() if rank == 0 else {}  # keeps rank 0's full tensors alive through sharding
    shard_model(model, mesh, args)
    if rank != 0:
        cuda = mesh.device_type == "cuda"
        model.to_empty(device=torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for _, buffer in sorted(model.named_buffers()):
        dist.broadcast(buffer, src=0)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` gathered to the full tensor (a collective: every rank must call it); others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the trainable parameters by name (collective under FSDP)."""
    return {n: full_tensor(p.detach()).float().cpu().contiguous() for n, p in trainable_named_parameters(model).items()}


if "fsdp2" not in StrategyRegistry:  # `trainer.strategy: fsdp2` in configs and on the command line
    StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 over all ranks (prism_lightning)")
