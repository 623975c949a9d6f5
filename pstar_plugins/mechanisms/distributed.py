"""Everything that knows about sharded parameters (DeepSpeed ZeRO-3 partitions, FSDP2's DTensors),
and about the ranks of a run, lives here.

Under ZeRO-3 a parameter's local ``numel()`` is 0 and its data lives in shards; under FSDP2
(``torch.distributed.fsdp.fully_shard``) a parameter is a DTensor whose local part is a shard
of dim 0. These helpers gather exactly what they are asked for (the method's tensors, embedding
rows), never a frozen weight, and are no-ops on ordinary tensors. The rank helpers
split work between the processes of a run and add their results; without a process group they
are the single-process identity.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pstar_plugins.mechanisms.recording import Recorder


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


_GATHERS = Recorder()


@contextlib.contextmanager
def recording_gathers() -> Iterator[list[list[int]]]:
    """While the block runs, record the ids of the parameters each :func:`gathered` call
    materialises: one list per call, in the list this yields (the training summary and the
    ZeRO-3 tests report what a step gathered; nothing is recorded outside such a block)."""
    with _GATHERS.recording() as calls:
        yield calls


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Temporarily materialise ZeRO-3 partitioned ``params`` (all ranks must enter).

    This is the only place the library gathers partitions. ``modifier_rank`` set: changes made
    on that rank are broadcast to the shards when the block ends.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    _GATHERS.add([id(p) for p in params])

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def gathered_module_by_module(model: nn.Module) -> Iterator[None]:
    """Let a forward of a ZeRO-3 partitioned ``model`` run outside the DeepSpeed engine (e.g. the
    attention-site probe of ``build_model``, which runs before ``accelerator.prepare``): each
    module's own partitioned parameters are gathered when the module starts and released when it
    returns, so at most one module's weights are whole at a time, as in the engine's own forward.
    Every rank must run the same forward. Parameters that are already whole are left alone."""

    def pending(module: nn.Module) -> list[torch.Tensor]:
        return [p for p in module.parameters(recurse=False) if is_partitioned(p) and p.data.numel() == 0]

    modules = [m for m in model.modules() if pending(m)]
    if not modules:
        yield
        return
    open_gathers: dict[int, contextlib.ExitStack] = {}

    def before(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(pending(module)))
        open_gathers[id(module)] = stack

    def after(module, args, output):
        stack = open_gathers.pop(id(module), None)
        if stack is not None:
            stack.close()

    handles = [m.register_forward_pre_hook(before) for m in modules] + [m.register_forward_hook(after) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_gathers.values():
            stack.close()


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 makes every parameter it shards one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return False
    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a DTensor's shards gathered (every rank of its mesh must call
    this), anything else as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) laid out as the DTensor ``like``: each
    rank keeps its own shard, nothing is communicated. Ordinary tensors pass through."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None
    )


def embedding_shape(embedding: nn.Module) -> tuple[int, int]:
    """``(vocab, hidden)`` of an embedding matrix; ZeRO-3 keeps the full shape in ``ds_shape``."""
    weight = embedding.weight
    rows, hidden = tuple(getattr(weight, "ds_shape", weight.shape))
    return int(rows), int(hidden)


def embedding_rows(embedding: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an embedding matrix as fp32 (``(len(ids), hidden)``), on its device.

    Under ZeRO-3 every rank must call this. The matrix is never gathered: each rank copies the
    parts of the requested rows that lie in its own flat partition into a zero buffer and one
    all-reduce of ``len(ids) × hidden`` numbers assembles them (each element lives on exactly one
    rank), so a 128k-token vocabulary costs no more than the rows asked for.
    """
    weight = embedding.weight
    ids = torch.as_tensor(ids).long().flatten().cpu()
    if is_dtensor(weight):
        return _dtensor_rows(weight, ids)
    if weight.is_meta:
        from pstar_plugins.contract.errors import IncompatibleModelError

        raise IncompatibleModelError(
            "the embedding matrix is on the meta device (Accelerate's fsdp_cpu_ram_efficient_loading leaves every rank "
            "but the first there until prepare), so the prompt cannot be initialised from it. Build the method on a "
            "model whose weights are loaded: set fsdp_cpu_ram_efficient_loading: false, or build after "
            "accelerator.prepare."
        )
    if not is_partitioned(weight):
        return weight.detach()[ids.to(weight.device)].float().clone()
    import torch.distributed as dist

    group = getattr(weight, "ds_process_group", None)
    local = weight.ds_tensor.detach().flatten()  # this rank's slice of the flattened matrix
    hidden = embedding_shape(embedding)[1]
    start = dist.get_rank(group=group) * local.numel()
    end = min(start + local.numel(), int(weight.ds_numel))
    out = torch.zeros(len(ids), hidden, dtype=torch.float32, device=local.device)
    for i, row in enumerate(ids.tolist()):
        lo, hi = row * hidden, (row + 1) * hidden
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out[i, a - lo : b - lo] = local[a - start : b - start].float()
    # with offload_param the shard lives in CPU memory, but NCCL reduces only device tensors:
    # the collective runs on the device DeepSpeed's accelerator names (the CPU under DS_ACCELERATOR=cpu)
    buffer = out.to(collective_device())
    dist.all_reduce(buffer, group=group)
    return buffer.to(local.device)


def collective_device() -> torch.device:
    """The device a DeepSpeed collective's tensors must be on: the current accelerator device."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _dtensor_rows(weight, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an FSDP2-sharded embedding (``Shard(0)``): each rank copies the rows it
    holds into a zero buffer and one all-reduce over the mesh assembles them (every rank of the
    mesh must call this); the matrix itself is never gathered."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    if tuple(weight.placements) != (Shard(0),):
        raise NotImplementedError(
            f"embedding rows of a DTensor placed as {weight.placements}; expected (Shard(0),), "
            "as fully_shard places parameters"
        )
    mesh = weight.device_mesh
    local = weight.to_local().detach()
    rows, hidden = weight.shape
    chunk = -(-rows // mesh.size())  # fully_shard gives rank r rows [r * chunk, (r + 1) * chunk)
    start = mesh.get_local_rank() * chunk
    out = torch.zeros(len(ids), hidden, dtype=torch.float32, device=local.device)
    mine = (ids >= start) & (ids < start + local.shape[0])
    if bool(mine.any()):
        out[mine.to(out.device)] = local[(ids[mine] - start).to(local.device)].float()
    dist.all_reduce(out, group=mesh.get_group())
    return out


def embedding_std(embedding: nn.Module, sample: int = 1024, seed: int = 0) -> float:
    """Standard deviation of the embedding entries, estimated on ``sample`` rows (no full gather)."""
    rows = embedding_shape(embedding)[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(rows, generator=g)[: min(sample, rows)]
    return float(embedding_rows(embedding, ids).std())


def gathered_state(
    params: list[torch.nn.Parameter], read: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """What ``read()`` returns (the adapter's tensors) as full CPU tensors, with the ZeRO-3
    partitions of ``params`` (the trainable ones) gathered while it reads.

    Every rank must call it (the gather is a collective); no frozen weight is gathered, unlike
    ``accelerator.get_state_dict`` with ``stage3_gather_16bit_weights_on_model_save`` which
    gathers the whole model (transformers#29980).
    """
    with gathered(params):
        # FSDP2: each trainable DTensor's shards gathered (a collective per tensor); frozen ones never
        return {k: full(v.detach()).to("cpu", copy=True) for k, v in read().items()}


def load_state_gathered(
    params: list[torch.nn.Parameter],
    targets: dict[str, torch.Tensor | None],
    state: dict[str, torch.Tensor],
    load: Callable[[dict[str, torch.Tensor]], None],
) -> None:
    """``load(state)`` with the ZeRO-3 partitions of ``params`` gathered and rank 0's values kept;
    under FSDP2 each full tensor of ``state`` is first cut to the shard of its ``targets`` entry
    (the parameter it loads into; ``None``: a tensor that is not a parameter)."""
    state = {k: v if targets[k] is None else shard_like(v, targets[k]) for k, v in state.items()}
    with gathered(params, modifier_rank=0):
        load(state)


def shut_down() -> None:
    """End this process's part of the process group once every rank got here, so that no rank
    exits while the communication threads of another are still running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_of_this_rank(items: list) -> list:
    """This rank's round-robin share of ``items`` (rank ``r`` of ``n`` takes ``r, r + n, ...``),
    padded with ``None`` so that every rank gets as many entries: under ZeRO-3 every forward is a
    collective, so each rank must call the model as often as the others, also on a padding entry."""
    rank, world = rank_and_world()
    rounds = -(-len(items) // world)
    return [items[k] if k < len(items) else None for k in range(rank, rounds * world, world)]


def sum_over_ranks(value: int) -> int:
    """``value`` added over every rank (every rank must call this)."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return value
    # NCCL reduces only CUDA tensors, gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


def all_ranks(value) -> list:
    """``value`` of every rank, in rank order (every rank must call this; picklable values)."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def any_partitioned(model: nn.Module) -> bool:
    """Whether ``model`` holds ZeRO-3 partitioned parameters (its forwards are then collectives)."""
    return any(is_partitioned(p) for p in model.parameters())
