"""train.distributed: fsdp - the transformer sharded over the processes (PyTorch FSDP2).

Each transformer block, then the rest of the model, is wrapped with `fully_shard`: every
process keeps 1/N of every parameter (the frozen base weights too, which is where the memory
goes) and gathers a block's weights just for its forward and backward. Gradients are averaged
across processes as under DDP, so both give the same LoRA up to float summation order.

Parameters become DTensors. What is saved is always the full tensor (gathered from all
processes; every process must call `full` in the same order), so checkpoints look exactly
like single-process ones, and a resumed run shards them again with `like`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def shard_transformer(
    transformer: nn.Module, trainable: Iterable[nn.Parameter], device: torch.device
) -> int:
    """Shard `transformer` block by block onto `device`; returns the number of blocks sharded.

    The transformer may sit on the CPU: each block moves to `device` only as it is sharded,
    so the device never holds the whole model. The trainable (LoRA) parameters are first made
    identical on every process (process 0's values): each process initialised its own, and
    sharding keeps each process's own slice.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for p in trainable:  # through the device: NCCL broadcasts GPU tensors only
            value = p.data.to(device)
            torch.distributed.broadcast(value, src=0)
            p.data.copy_(value)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = [b for name in BLOCK_LISTS for b in getattr(transformer, name, [])]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    return len(blocks)


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors), detached."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    return tensor.detach()


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) placed as `param` is: sharded the same way for DTensors."""
    value = value.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: full(v) if torch.is_tensor(v) else v for k, v in sorted(entry.items())}
        for index, entry in sorted(state["state"].items())
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full_optimizer_state() dict, then shard each tensor like its parameter."""
    optimizer.load_state_dict(state)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if not isinstance(p, DTensor):
            continue
        entry = optimizer.state.get(p, {})
        for key, value in entry.items():
            if torch.is_tensor(value) and value.shape == p.shape and not is_sharded(value):
                entry[key] = like(p, value)
