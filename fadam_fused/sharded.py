"""Sharded parameters (DTensor: FSDP2, HSDP, tensor parallel): the RMS of the whole logical tensor.

[note: sharded parameters]
FAdam's clip scales need RMS(ghat) and RMS(w) over every element of a parameter, but a DTensor
parameter holds one shard per rank. Clipping by the shard's RMS would train another model than one
process does, so a step over DTensor parameters runs:

1. phase A on each rank's local shards (``to_local()`` of the param, its grad and its DTensor
   ``momentum`` / ``fim``, placed like the param), every tensor writing its partial sums
   (``fuse_one_chunk=False``, [note: the two-phase op contract] in op_contract.py);
2. the per-tensor float64 pairs (sum ghat^2, sum w^2) all-reduced (SUM) over the mesh dims that
   split the tensor (``Shard(d)``, and the ``_StridedShard`` of FSDP2 over tensor parallel: every
   placement but ``Replicate``), plus the step's non-finite flag over every mesh dim, so a NaN on
   one rank skips the step on all of them (the flag is 0 or 1, so a SUM > 0 is the MAX). One
   all-reduce per process group (mesh dim) and step packs everything: a row for the flag, then a
   row per tensor split over that dim. The dims of a mesh are reduced one after another (a sum
   over several dims is the sum over each in turn), in the order the parameters first use them,
   which is the same on every rank as long as every rank steps the same parameters (FSDP2 and
   DTensor autograd give every rank a gradient or none). Payload: 16 bytes per tensor per mesh
   dim that splits it, plus 16 per group; with clipping off the flag row alone;
3. phase B on the local shards, with the totals where it reads them: a fused backend adds up a
   tensor's slots and divides by the local numel, so the first slot gets
   total * local_numel / global_numel and the others 0; the reference backend gets the totals and
   the global numel (reference.update_tensor's ``sums`` and ``numel``).

Uneven and empty shards need nothing special: FSDP2 pads dim 0, and a rank whose shard has zero
rows adds 0 and updates nothing. Nothing here waits on the host for a device: the collectives are
``dist.all_reduce`` on the default stream (asynchronous towards the host with NCCL; gloo on CPU
tensors runs them on the host, as it must), and index tensors reach an accelerator through pinned
memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from . import op_contract, reference

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


def state_like(param: Tensor, saved: Tensor) -> Tensor:
    """`saved` (a loaded momentum or fim) as float32 state of `param`: in the parameter's own
    layout (a contiguous checkpoint loads into a channels_last parameter's optimizer), and for a
    DTensor parameter placed like it. A whole plain tensor loaded into a sharded optimizer (every
    rank read the same full checkpoint) is cut into this rank's shard without communication."""
    if is_dtensor(param) and not is_dtensor(saved):
        whole = saved.to(device=param.device, dtype=torch.float32)
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    return torch.empty_like(param, dtype=torch.float32).copy_(saved)


@dataclasses.dataclass
class Shards:
    """The sharding of one bucket's local tensors, parallel to its lists, and their sums."""

    device: torch.device
    clip: bool  # False: no RMS, only the flag is reduced
    global_numels: list[int] = dataclasses.field(default_factory=list)
    local_numels: list[int] = dataclasses.field(default_factory=list)
    # Per tensor: (mesh, mesh dims on which it is sharded), the dims its sums are reduced over.
    layouts: list[tuple[Any, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    # Phase A's output: a fused backend's partials [n_slots, 2] and its chunk size, or the
    # reference's per-tensor sums [n, 2]. After all_reduce, `sums` holds the whole tensors' sums.
    partials: Tensor | None = None
    chunk_size: int = 0
    sums: Tensor | None = None

    def add(self, param: Tensor, local_numel: int) -> None:
        """Records DTensor `param`, whose local shard has `local_numel` elements."""
        # Every placement but Replicate splits the tensor over that dim: Shard, and the
        # _StridedShard of FSDP2 over tensor parallel (whose is_shard() is False).
        dims = tuple(d for d, pl in enumerate(param.placements) if not pl.is_replicate())
        self.global_numels.append(param.numel())
        self.local_numels.append(local_numel)
        self.layouts.append((param.device_mesh, dims))

    def reference_phase_a(self, params: list[Tensor], grads: list[Tensor], fims: list[Tensor],
                          steps: list[Tensor], *, beta2: float, eps: float, p: float,
                          maximize: bool, grad_scale: Tensor | None) -> None:
        """The reference backend's phase A: `sums` of every local shard."""
        if not self.clip:
            return
        self.sums = torch.stack([
            reference.square_sums(param, grad, f, step, beta2=beta2, eps=eps, p=p,
                                  maximize=maximize, grad_scale=grad_scale)
            for param, grad, f, step in zip(params, grads, fims, steps)])

    def reference_args(self, i: int) -> dict[str, Any]:
        """reference.update_tensor's `sums` and `numel` for tensor i."""
        return dict(sums=self.sums[i] if self.clip else None, numel=self.global_numels[i])


def localize(param: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The local shards of a DTensor parameter and of its gradient, placed alike."""
    if grad.placements != param.placements:
        # The kernels walk a shard of the parameter and the same shard of its gradient. A
        # Replicate gradient of a Shard parameter (a distribute_tensor weight in a matmul)
        # becomes a local slice; a Partial one costs one all-reduce of this tensor.
        grad = grad.redistribute(param.device_mesh, param.placements)
    return param.to_local(), grad.to_local()


def _index(values: list[int], device: torch.device, dtype=torch.int64) -> Tensor:
    """A host list as a tensor on `device`, without a host sync (pinned memory, async copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _current_index(device_type: str) -> int:
    module = getattr(torch, device_type, None)
    return module.current_device() if module is not None and hasattr(
        module, "current_device") else 0


def _local_sums(shards: Shards) -> Tensor:
    """[n, 2] float64: each tensor's (sum ghat^2, sum w^2) over its local shard."""
    if shards.sums is not None:  # the reference backend's
        return shards.sums
    parts = shards.partials
    nchunks = [op_contract.nchunks_of(n, shards.chunk_size) for n in shards.local_numels]
    if all(c == 1 for c in nchunks):
        return parts
    # A tensor's slots are consecutive; segment_reduce adds each run in order (deterministic).
    return torch.segment_reduce(parts, "sum", lengths=_index(nchunks, parts.device), axis=0)


def all_reduce(all_shards: list[Shards], skip: dict[torch.device, Tensor]) -> None:
    """Between the phases: the packed all-reduce of [note: sharded parameters].

    Replaces every Shards' partials (or `sums`) by the whole tensors' sums and sets every flag in
    `skip` (one per device, all equal) to the flag of every rank of the meshes.
    """
    if not all_shards:
        return
    device = all_shards[0].device  # where the collectives run (a rank's DTensors share one)
    sums = [_local_sums(s).to(device) if s.clip else None for s in all_shards]

    # The process groups in first-use order (the same on every rank: the parameter order), and
    # per group the (bucket, tensor) pairs sharded over it.
    groups: dict[str, tuple[Any, str, list[list[int]]]] = {}
    for b, shards in enumerate(all_shards):
        for i, (mesh, dims) in enumerate(shards.layouts):
            for d in range(mesh.ndim):
                group = mesh.get_group(d)
                name = group.group_name
                if name not in groups:
                    groups[name] = (group, mesh.device_type, [[] for _ in all_shards])
                if shards.clip and d in dims:
                    groups[name][2][b].append(i)

    # The flags of all devices are equal here (the optimizer's _combine_devices).
    flag = skip[device].to(torch.float64).reshape(1, 1).expand(1, 2)
    for group, device_type, members in groups.values():
        rows = [flag]
        for b, idx in enumerate(members):
            if not idx:
                continue
            if len(idx) == sums[b].shape[0]:  # every tensor of the bucket (FSDP2's usual case)
                rows.append(sums[b])
            else:
                rows.append(sums[b].index_select(0, _index(idx, device)))
        buf = torch.cat(rows)
        if device_type != device.type:
            # FSDP2 with CPUOffloadPolicy: CPU shards, NCCL mesh. The CPU kernels read the
            # result on the host anyway, so the copy back waits for it.
            on_mesh = buf.to(torch.device(device_type, _current_index(device_type)))
            dist.all_reduce(on_mesh, op=dist.ReduceOp.SUM, group=group)
            buf = on_mesh.to(device)
        else:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        flag = buf[:1]
        offset = 1
        for b, idx in enumerate(members):
            if not idx:
                continue
            if len(idx) == sums[b].shape[0]:
                sums[b] = buf[offset:offset + len(idx)]
            else:
                sums[b] = sums[b].index_copy(0, _index(idx, device), buf[offset:offset + len(idx)])
            offset += len(idx)

    skipped = (flag[0, 0] > 0).to(torch.float32)
    for flag_of_device in skip.values():
        flag_of_device.copy_(skipped)
    for shards, total in zip(all_shards, sums):
        if not shards.clip:
            continue
        if shards.partials is None:
            shards.sums = total.to(shards.sums.device)
            continue
        # Phase B divides a tensor's slot total by its local numel: scale the whole tensor's sums
        # by local / global, put them in the tensor's first slot and zero the others.
        parts = shards.partials
        scale = [n / g if g else 0.0 for n, g in zip(shards.local_numels, shards.global_numels)]
        offsets = op_contract.slot_offsets(shards.local_numels, shards.chunk_size)
        firsts = offsets[:-1]
        scaled = total.to(parts.device) * _index(scale, parts.device, torch.float64)[:, None]
        if offsets[-1] == len(firsts):  # one slot per tensor
            parts.copy_(scaled)
        else:
            parts.zero_()
            parts.index_copy_(0, _index(firsts, parts.device), scaled)
