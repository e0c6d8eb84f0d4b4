"""`--strategy fsdp`: parameters, gradients and optimizer state sharded over the ranks (PyTorch's FSDP2,
`fully_shard`), for models whose DDP copy does not fit one device.

Checkpoints stay interchangeable with DDP and single-process runs: the model and EMA are saved as full
state dicts (ordinary tensors, the names a plain model has) and the optimizer state in torch's usual
id-keyed layout (parameter i of the flattened param groups), converted from and to the sharded
optimizer's own name-keyed layout here. So a run may be saved under one strategy and resumed, evaluated
or exported under the other, on any number of ranks.

Each transformer block is its own FSDP unit (its parameters gathered for its forward and backward only);
the root unit holds the embeddings, the conditioning projection and the head. Every function here is a
collective: all ranks call it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def shard(model: nn.Module, device: torch.device, blocks: str = "blocks") -> nn.Module:
    """Rank 0's weights on every rank, then fully_shard each module of model.<blocks> and the model itself
    (in place); returns the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Ranks seed differently, so each built its own random init: rank 0's wins, as DDP's constructor
    # would make it (fully_shard keeps each rank's values of its own shard, it broadcasts nothing).
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in getattr(model, blocks):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _options(rank0_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload=True: gathered on rank 0 only (to the CPU); False: every rank gets the full tensors.
    return StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)


def full_model_state(model: nn.Module, rank0_only: bool = True) -> dict:
    """The model's full (unsharded) state dict: on rank 0 only (others get {}) unless rank0_only=False."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(rank0_only))


def _names_in_order(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's flattened param-group order: the id-keyed layout's index."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state as opt.state_dict() of the unsharded model would give it (rank 0; {} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, opt, options=_options(True))
    if not named:
        return {}
    index = {name: i for i, name in enumerate(_names_in_order(model, opt))}
    state = {index[name]: value for name, value in named["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in named["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load an id-keyed (ordinary) optimizer state dict into the sharded optimizer (every rank passes it)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names_in_order(model, opt)
    named = {"state": {names[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, optim_state_dict=named, options=_options(False))


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm clip_grad_norm_ returns under FSDP) as an ordinary tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
