"""Sharded parameters (DTensor: FSDP2, HSDP, tensor parallel): sums over the whole logical tensor.

[note: sharded parameters]
The family's clip scales need RMS(ghat) and RMS(w) over every element of a parameter, and
FAdafactor's factors need row and column sums over whole rows and columns, but a DTensor
parameter holds one shard per rank. A step over DTensor parameters therefore runs every stage on
each rank's local shards (``to_local()`` of the param, its grad and its DTensor state, placed
like the param), and between stages the engine hands this module the float64 sums the stage
made (``Reduction``s: rows of sums, each to be added up over the mesh dims that split its tensor).
``all_reduce`` adds them up in ONE packed all-reduce per process group (mesh dim) and stage,
which also carries the step's skip flag and the count of ranks that refused the step, so a NaN
(or a refused step) on one rank skips the step on every rank. This module knows sums, meshes and
the op contract's slot layout; it never knows which optimizer made them.

The dims of a mesh are reduced one after another (a sum over several dims is the sum over each in
turn), in the order the tensors first use them, which is the same on every rank as long as every
rank steps the same parameters (FSDP2 and DTensor autograd give every rank a gradient or none).
Every placement but ``Replicate`` splits a tensor: ``Shard(d)``, and the ``_StridedShard`` of
FSDP2 over tensor parallel. Uneven and empty shards need nothing special: FSDP2 pads dim 0, and a
rank whose shard has zero rows adds 0 and updates nothing. Nothing here waits on the host for a
device: the collectives are ``dist.all_reduce`` on the default stream (asynchronous towards the
host with NCCL; gloo on CPU tensors runs them on the host, as it must), and index tensors reach
an accelerator through pinned memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import op_contract

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
else:  # a torch build without distributed: no tensor can be a DTensor
    dist = None
    DTensor = ()


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def check(name: str, param: Tensor, grad: Tensor) -> str | None:
    """None if this DTensor/plain (param, grad) pair can be stepped; otherwise why not (the
    message of the caller's error, which names the parameter)."""
    if not (is_dtensor(param) or is_dtensor(grad)):
        return None
    if not (is_dtensor(param) and is_dtensor(grad)):
        kinds = ["a DTensor" if is_dtensor(t) else "a plain tensor" for t in (param, grad)]
        return (f"{name} is {kinds[0]} but its gradient is {kinds[1]}; a sharded parameter "
                "needs a DTensor gradient on the same device mesh.")
    if grad.device_mesh != param.device_mesh:
        return (f"The gradient of {name} is on device mesh {grad.device_mesh}, but the parameter "
                f"is on {param.device_mesh}.")
    if any(pl.is_partial() for pl in param.placements):
        return (f"{name} has placements {param.placements}: a Partial parameter has no value "
                "to update until it is reduced; use Shard or Replicate placements.")
    return None


def placed_like(template: Tensor, saved: Tensor) -> Tensor:
    """`saved` (a loaded state tensor) as state of `template`'s dtype, laid out and placed like
    `template` (the kind's fresh state of the parameter): in the parameter's layout (a
    contiguous checkpoint loads into a channels_last parameter's optimizer), and for a DTensor
    parameter placed like its state. A whole plain tensor loaded into a sharded optimizer
    (every rank read the same full checkpoint) is cut into this rank's shard without
    communication."""
    with torch.inference_mode(False):
        if is_dtensor(template) and not is_dtensor(saved):
            whole = saved.to(device=template.device, dtype=template.dtype)
            return distribute_tensor(whole, template.device_mesh, template.placements,
                                     src_data_rank=None)
        return torch.empty_like(template).copy_(saved)


def state_like(param: Tensor, saved: Tensor) -> Tensor:
    """`saved` as float32 state shaped like `param`, in its layout and placement."""
    with torch.inference_mode(False):
        template = torch.empty_like(param, dtype=torch.float32)
    return placed_like(template, saved)


def localize(param: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The local shards of a DTensor parameter and of its gradient, placed alike."""
    if grad.placements != param.placements:
        # The kernels walk a shard of the parameter and the same shard of its gradient. A
        # Replicate gradient of a Shard parameter (a distribute_tensor weight in a matmul)
        # becomes a local slice; a Partial one costs one all-reduce of this tensor.
        grad = grad.redistribute(param.device_mesh, param.placements)
    return param.to_local(), grad.to_local()


@dataclasses.dataclass
class Layout:
    """How the tensors of one sharded bucket are split, parallel to its lists of local shards."""

    device: torch.device
    meshes: list[Any] = dataclasses.field(default_factory=list)
    # Per tensor: the mesh dims that split it (every placement but Replicate).
    split_dims: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    placements: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    global_shapes: list[torch.Size] = dataclasses.field(default_factory=list)
    global_numels: list[int] = dataclasses.field(default_factory=list)
    local_numels: list[int] = dataclasses.field(default_factory=list)
    # Per tensor: (base, inner_local, inner_global) of its local block in the logical tensor
    # ([note: stochastic rounding] in op_contract.py), or None where the block is not one
    # rectangular slice along one dim (see _block_place), with this rank's coordinate then.
    places: list[tuple[int, int, int] | None] = dataclasses.field(default_factory=list)
    coordinates: list[int] = dataclasses.field(default_factory=list)

    def add(self, param: Tensor, local_param: Tensor) -> None:
        """Records DTensor `param`, whose local shard is `local_param`."""
        place = _block_place(param, local_param)
        self.places.append(place)
        coordinate = 0
        if place is None:
            for size, c in zip(param.device_mesh.shape, param.device_mesh.get_coordinate() or ()):
                coordinate = coordinate * size + c
        self.coordinates.append(coordinate)
        self.meshes.append(param.device_mesh)
        self.split_dims.append(tuple(d for d, pl in enumerate(param.placements)
                                     if not pl.is_replicate()))
        self.placements.append(tuple(param.placements))
        self.global_shapes.append(param.shape)
        self.global_numels.append(param.numel())
        self.local_numels.append(local_param.numel())

    def rounding_row(self, i: int, seed: int) -> list[int]:
        """Tensor i's [seed, base, inner_local, inner_global] row of the update ops' rounding
        list: its local block's place in the logical tensor, so that sharding does not change
        the bits. A block that is no single slice (two mesh dims splitting two tensor dims,
        FSDP2's strided shard over tensor parallel, a non-contiguous shard) falls back to its
        local index with the rank's mesh coordinate mixed into the seed: still unbiased, but
        not the bits of one process."""
        place = self.places[i]
        if place is None:
            mixed = op_contract.fmix32(seed ^ ((self.coordinates[i] + 1) * 0x85EBCA6B))
            numel = max(1, self.local_numels[i])
            return [mixed, 0, numel, numel]
        return [seed, *place]

    def mesh_dims_splitting(self, i: int, tensor_dims: Sequence[int]) -> tuple[int, ...]:
        """The mesh dims whose placement shards tensor i along one of `tensor_dims` (negative
        dims count from the end)."""
        rank = len(self.global_shapes[i])
        wanted = {d % rank for d in tensor_dims}
        return tuple(d for d, pl in enumerate(self.placements[i])
                     if not pl.is_replicate() and getattr(pl, "dim", None) is not None
                     and pl.dim % rank in wanted)


def _block_place(param: Tensor, local_param: Tensor) -> tuple[int, int, int] | None:
    """(base, inner_local, inner_global) of DTensor `param`'s local block `local_param` when the
    block is the whole tensor or a slice [o, o + k) of one dim d (FSDP2's Shard(0), a tensor
    parallel Shard(d)): local element e is then logical element base + (e / inner_local) *
    inner_global + e % inner_local with inner = the elements after dim d, base = o * inner,
    inner_local = k * inner, inner_global = size(d) * inner. None otherwise."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - a torch without them: the fallback
        return None
    if any(isinstance(pl, _StridedShard) for pl in param.placements):
        return None
    if not local_param.is_contiguous():
        return None
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    split = [d for d, (k, n, o) in enumerate(zip(shape, param.shape, offset)) if k != n or o]
    if tuple(shape) != tuple(local_param.shape) or len(split) > 1:
        return None
    numel = param.numel()
    if not split or local_param.numel() == 0:
        return (0, max(1, numel), max(1, numel))
    d = split[0]
    inner = 1
    for size in param.shape[d + 1:]:
        inner *= size
    return (offset[d] * inner, shape[d] * inner, param.shape[d] * inner)


def groups_of(mesh: Any, dims: Sequence[int] | None = None) -> tuple[Any, ...]:
    """The process groups of `mesh`'s dims `dims` (all of them by default)."""
    return tuple(mesh.get_group(d) for d in (range(mesh.ndim) if dims is None else dims))


@dataclasses.dataclass
class Reduction:
    """Float64 sums to add up across ranks, then ``done(values)``.

    `values` is 1-D; each segment ``(start, end, groups)`` says that ``values[start:end]`` is
    added up over each of those process groups in turn (consecutive segments with the same
    groups are one segment: add them with ``segment``). `flag_groups` are the groups the skip
    flag is reduced over: every dim of the meshes of the tensors behind the sums (also of those
    with no sums, e.g. with clipping off), or a data-parallel group.
    """

    values: Tensor | None
    flag_groups: list[Any] = dataclasses.field(default_factory=list)
    segments: list[tuple[int, int, tuple[Any, ...]]] = dataclasses.field(default_factory=list)
    done: Callable[[Tensor], None] | None = None

    def segment(self, start: int, end: int, groups: tuple[Any, ...]) -> None:
        if not groups or end == start:
            return
        if self.segments:
            s, e, g = self.segments[-1]
            if e == start and g == groups:
                self.segments[-1] = (s, end, g)
                return
        self.segments.append((start, end, groups))


def layout_reduction(layout: "Layout", values: Tensor | None = None) -> Reduction:
    """A Reduction whose flag goes over every mesh dim of a sharded bucket's tensors."""
    flag_groups: list[Any] = []
    for mesh in layout.meshes:
        for pg in groups_of(mesh):
            if pg not in flag_groups:
                flag_groups.append(pg)
    return Reduction(values, flag_groups)


def _index(values: list[int], device: torch.device, dtype=torch.int64) -> Tensor:
    """A host list as a tensor on `device`, without a host sync (pinned memory, async copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def slot_reduction(partials: Tensor, chunk_size: int, layout: Layout) -> Reduction:
    """The RMS sums of a sharded bucket's phase A (partials [n_slots, 2] in the slot layout of
    [note: the two-phase op contract]) as a Reduction over every tensor's split dims.

    Phase B adds up a tensor's slots and divides by the local numel, so ``done`` puts the whole
    tensor's sums, times local numel / global numel, into the tensor's first slot and zeros the
    others.
    """
    nchunks = [op_contract.nchunks_of(n, chunk_size) for n in layout.local_numels]
    if all(c == 1 for c in nchunks):
        sums = partials
    else:  # a tensor's slots are consecutive; segment_reduce adds each run in order
        sums = torch.segment_reduce(partials, "sum", lengths=_index(nchunks, partials.device),
                                    axis=0)

    def done(total: Tensor) -> None:
        scale = [n / g if g else 0.0 for n, g in zip(layout.local_numels, layout.global_numels)]
        offsets = op_contract.slot_offsets(layout.local_numels, chunk_size)
        firsts = offsets[:-1]
        scaled = total.view(-1, 2) * _index(scale, partials.device, torch.float64)[:, None]
        if offsets[-1] == len(firsts):  # one slot per tensor
            partials.copy_(scaled)
        else:
            partials.zero_()
            partials.index_copy_(0, _index(firsts, partials.device), scaled)

    red = layout_reduction(layout, sums.reshape(-1))
    red.done = done
    for i, (mesh, dims) in enumerate(zip(layout.meshes, layout.split_dims)):
        red.segment(2 * i, 2 * i + 2, groups_of(mesh, dims))
    return red


def flag_reduction(layout: Layout) -> Reduction:
    """Only the skip flag, over every mesh dim of the bucket's tensors (clipping off)."""
    return layout_reduction(layout)


def _collective_device(pg: Any, device: torch.device) -> torch.device:
    """Where `pg` reduces a buffer that lives on `device`: NCCL needs a GPU (FSDP2 with
    CPUOffloadPolicy keeps CPU shards on an NCCL mesh)."""
    if device.type == "cpu" and dist.get_backend(pg) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce(reductions: Sequence[Reduction], skip: dict[torch.device, Tensor], *,
               refused: bool = False) -> Tensor:
    """The packed all-reduce of [note: sharded parameters].

    Adds up every Reduction's segments over their process groups and calls its ``done``, and
    sets every flag in `skip` (one per device, all equal) to the flag of every rank of the
    groups. Returns how many ranks refused the step (a float64 0-dim tensor on the collectives'
    device; this rank counts itself when `refused`).
    """
    device = next(iter(skip))
    for red in reductions:
        if red.values is not None:
            device = red.values.device  # where the collectives run (a rank's DTensors share one)
            break
    values = [None if r.values is None else r.values.to(device, torch.float64)
              for r in reductions]

    # The process groups in first-use order (the same on every rank: the parameter order), and
    # per group the (reduction, start, end) ranges added up over it.
    groups: dict[str, tuple[Any, list[tuple[int, int, int]]]] = {}

    def ranges_of(pg):
        if pg.group_name not in groups:
            groups[pg.group_name] = (pg, [])
        return groups[pg.group_name][1]

    for r, red in enumerate(reductions):
        for pg in red.flag_groups:
            ranges_of(pg)
        for start, end, segment_groups in red.segments:
            for pg in segment_groups:
                ranges = ranges_of(pg)
                if ranges and ranges[-1][0] == r and ranges[-1][2] == start:
                    ranges[-1] = (r, ranges[-1][1], end)
                else:
                    ranges.append((r, start, end))

    # [skip, refused]: both 0 or 1 per rank, so a sum > 0 is the max.
    flag = torch.stack([skip[device].to(device, torch.float64).reshape(()),
                        torch.full((), float(refused), dtype=torch.float64, device=device)])
    for pg, ranges in groups.values():
        buf = torch.cat([flag] + [values[r][start:end] for r, start, end in ranges])
        there = _collective_device(pg, device)
        if there != device:  # the CPU kernels read the result on the host anyway: it waits
            on_there = buf.to(there)
            dist.all_reduce(on_there, op=dist.ReduceOp.SUM, group=pg)
            buf = on_there.to(device)
        else:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg)
        flag = buf[:2]
        offset = 2
        for r, start, end in ranges:
            values[r][start:end] = buf[offset:offset + end - start]
            offset += end - start

    skipped = (flag.amax() > 0).to(torch.float32)
    for flag_of_device in skip.values():
        flag_of_device.copy_(skipped)
    for red, total in zip(reductions, values):
        if red.done is not None:
            red.done(total.to(red.values.device))
    return flag[1]
