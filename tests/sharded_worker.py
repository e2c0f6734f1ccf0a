"""Multi-process scenarios of tests/test_sharded.py, run under torchrun (gloo, CPU tensors).

    torchrun --nproc_per_node 2 tests/sharded_worker.py fsdp_shard0:cpu tp:reference ...

With FADAM_SHARDED_DEVICE=cuda the same scenarios run on one GPU per rank over NCCL.

Each scenario trains a tiny model for STEPS steps with a sharded FAdam (or FAdafactor: a scenario
item's third field, `fsdp_shard0:cpu:fadafactor`) and compares every parameter
and its whole state (gathered with full_tensor()) with a one-process run of the same model, data and
optimizer that every rank computes itself. Rank 0 prints "PASS <scenario>" per scenario; any failure
ends the process with a traceback (torchrun then stops the other ranks). The process group has a
60 s timeout, so a rank that misses a collective fails the launch instead of hanging it.

The single-process parts of the checkpoint tests (save or load on one process) are functions here
too, called by test_sharded.py in its own process.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import traceback
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fadam_fused import AdaFisher, FAdafactor, FAdam, sharded  # noqa: E402

STEPS = 8
DEVICE = os.environ.get("FADAM_SHARDED_DEVICE", "cpu")
HYPER = dict(lr=3e-2, clip=0.5, weight_decay=0.1)
OPTIMIZERS = {"fadam": FAdam, "fadafactor": FAdafactor, "adafisher": AdaFisher}
OPT = FAdam  # the optimizer of the running scenario (main sets it)


def make_opt(model, backend, *, clip=HYPER["clip"], one_process=False, params=None):
    """OPT over `model` with the scenarios' hyperparameters. AdaFisher measures the model's
    layers (factors updated every other step); `one_process`: its factors are this rank's alone
    (the one-process run each rank makes inside the distributed job)."""
    if OPT is AdaFisher:
        return AdaFisher(model, params, lr=1e-3, weight_decay=0.1, update_interval=2,
                         backend=backend, process_group=False if one_process else None)
    return OPT(model.parameters() if params is None else params, **{**HYPER, "clip": clip},
               backend=backend)
RTOL, ATOL = 1e-5, 1e-7


class Tiny(nn.Module):
    """An MLP whose dims give FSDP2 on 2 or 4 ranks empty shards (a's weight has 1 row) and uneven
    ones (5 and 7 rows)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 1)
        self.b = nn.Linear(1, 5)
        self.c = nn.Linear(5, 7)
        self.d = nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.c(h))
        return self.d(h)


class TinyMixed(Tiny):
    """Tiny with a float64 last layer: under backend=None its tensors run on the reference backend
    and the others fused, two sharded buckets in one step."""

    def __init__(self):
        super().__init__()
        self.d.double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.c(h))
        return self.d(h.double()).float()


class TinyBatched(Tiny):
    """Tiny with a 3-D parameter: a batch of 3 matrices of 4 x 5 in a batched matmul. FSDP2's
    Shard(0) splits its batch dim unevenly (2 and 1 matrices on 2 ranks): each matrix is whole on
    its rank, so FAdafactor's R and C need no exchange, only the RMS sums."""

    def __init__(self):
        super().__init__()
        self.batched = nn.Parameter(torch.randn(3, 4, 5) * 0.3)

    def forward(self, x):
        z = torch.einsum("ri,bij->rbj", x[:, :4], self.batched).mean(-1)
        return super().forward(x) + z


class TPModel(nn.Module):
    """up / down are parallelized (ColwiseParallel: Shard(0) weight and bias; RowwiseParallel:
    Shard(1) weight, Replicate bias); `extra` becomes a distribute_tensor Shard(0) parameter; head
    stays a plain tensor in the same optimizer."""

    def __init__(self):
        super().__init__()
        # 8 hidden units: ColwiseParallel's uneven output shards fail in DTensor's matmul here;
        # `extra` (5 rows on 2 ranks) is the uneven tensor-parallel shard.
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)
        self.extra = nn.Parameter(torch.randn(5, 3) * 0.5)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        y = self.head(torch.tanh(h))
        extra = self.extra
        if sharded.is_dtensor(extra):
            from torch.distributed.tensor import DTensor, Replicate
            xd = DTensor.from_local(x[:, :5], extra.device_mesh, [Replicate()])
            return y + (xd @ extra).full_tensor()
        return y + x[:, :5] @ extra


def data(step: int, rows: int = 8):
    gen = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(rows, 6, generator=gen) * 2, torch.randn(rows, 3, generator=gen)
    return x.to(DEVICE), y.to(DEVICE)


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().to(DEVICE)


def train(model, opt, steps, start=0, rank=0, world=1):
    """`steps` steps on data(start..); each of `world` data-parallel ranks takes its rows."""
    for k in range(start, start + steps):
        x, y = data(k)
        rows = x.shape[0] // world
        x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def full(t):
    return t.full_tensor() if sharded.is_dtensor(t) else t


def snapshot(model, opt) -> dict[str, torch.Tensor]:
    """Every parameter and its state, whole (gathered), by name."""
    out = {}
    for name, p in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "").replace("module.", "")
        out[name] = full(p.detach()).clone()
        for key, value in opt.state[p].items():
            out[f"{name}.{key}"] = full(value).clone()
    if isinstance(opt, AdaFisher):  # the layers' factors (replicated on every rank)
        for name, layer in opt._factors.layers.items():
            name = name.replace("module.", "")
            out[f"{name}.H"], out[f"{name}.S"] = layer.fisher_in.clone(), layer.fisher_out.clone()
    return out


def assert_match(got: dict, want: dict, what: str, rtol=RTOL, atol=ATOL):
    assert got.keys() == want.keys(), (what, sorted(got), sorted(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol,
                                   msg=lambda m, k=k: f"{what}: {k}: {m}")


def single_run(cls, backend, steps=STEPS, clip=HYPER["clip"]):
    model = make(cls)
    opt = make_opt(model, backend, clip=clip, one_process=True)
    train(model, opt, steps)
    return snapshot(model, opt)


def assert_clip_binds(cls, backend, ref):
    """The comparison means something only if clip=0.5 changes the result."""
    if OPT is AdaFisher:  # no clipping
        return
    unclipped = single_run(cls, backend, clip=None)
    diff = max((unclipped[k] - ref[k]).abs().max().item() for k in ref if "." in k)
    assert diff > 1e-3, f"clip=0.5 does not bind (largest change {diff})"


def with_all_reduce(opt, replacement):
    """Makes opt.step call `replacement(original, buf, op, group)` for torch.distributed's
    all_reduce (only inside step: the gradient reduction of DDP or HSDP is left alone)."""
    step = opt.step

    def patched_step(*args, **kwargs):
        original = sharded.dist.all_reduce
        sharded.dist.all_reduce = lambda buf, op, group: replacement(original, buf, op, group)
        try:
            return step(*args, **kwargs)
        finally:
            sharded.dist.all_reduce = original
    opt.step = patched_step


def all_reduce_shapes(model, opt, rank, world) -> list[tuple[int, ...]]:
    """The buffer shape of every all-reduce of one more optimizer step."""
    shapes = []

    def counting(original, buf, op, group):
        shapes.append(tuple(buf.shape))
        original(buf, op=op, group=group)
    with_all_reduce(opt, counting)
    train(model, opt, 1, start=STEPS, rank=rank, world=world)
    del opt.step
    return shapes


# -------------------------------------------------------------------------------------------------
# Scenarios: each takes the backend name.

def _fsdp(mesh=None, placement_fn=None, cls=Tiny, model=None):
    from torch.distributed.fsdp import fully_shard
    model = make(cls) if model is None else model
    for m in model.children():
        fully_shard(m, mesh=mesh, shard_placement_fn=placement_fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement_fn)
    return model


def _compare_dp(model, backend, world, rank, what, cls=Tiny, collectives=None):
    """FSDP-style data parallel against one process; then, if given, the expected buffer shapes
    of the sums' all-reduces in one more step."""
    opt = make_opt(model, backend)
    train(model, opt, STEPS, rank=rank, world=world)
    ref = single_run(cls, backend)
    assert_match(snapshot(model, opt), ref, what)
    if isinstance(collectives, dict):
        collectives = collectives.get(OPT)
    if collectives is not None:
        shapes = all_reduce_shapes(model, opt, rank, world)
        assert shapes == collectives, f"{what}: all-reduces {shapes}, expected {collectives}"
    return ref


def fsdp_shard0(backend, rank, world):
    import torch.distributed as dist
    model = _fsdp()
    a_rows = [model.a.weight.to_local().shape[0]]
    gathered = [None] * world
    dist.all_gather_object(gathered, a_rows)
    assert [0] in gathered, f"no empty shard: {gathered}"
    # FAdam: one all-reduce per step, the flag pair (skip, refused) and the 8 tensors' two sums.
    # FAdafactor: two. After phase S the flag, the biases' RMS sums (4 x 2) and per weight its
    # column sums and the two totals of sum R (a: 6 + 2, b: 1 + 2, c: 5 + 2, d: 7 + 2; its row
    # sums are whole on each rank: Shard(0) splits rows); after phase A the flag and the weights'
    # RMS sums (4 x 2).
    ref = _compare_dp(model, backend, world, rank, f"fsdp Shard(0) {backend}",
                      collectives={FAdam: [(18,)], FAdafactor: [(37,), (10,)]})
    assert_clip_binds(Tiny, backend, ref)
    if OPT is AdaFisher:
        return
    # Negative control: without the all-reduce of the sums (each rank clipping by its own
    # shard's sums), the run must not match.
    model = _fsdp()

    def flag_only(original, buf, op, group):  # reduce the flag pair only
        head = buf[:2].clone()
        original(head, op=op, group=group)
        buf[:2].copy_(head)
    opt = make_opt(model, backend)
    with_all_reduce(opt, flag_only)
    train(model, opt, STEPS, rank=rank, world=world)
    got = snapshot(model, opt)
    diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert diff > 1e-3, f"shard-local sums gave the same result ({diff}): the test cannot fail"


def fsdp_mixed_dtypes(backend, rank, world):
    """float32 parameters fused and float64 ones on the reference backend (backend=None), both
    sharded: their sums share the one all-reduce."""
    _compare_dp(_fsdp(cls=TinyMixed), None, world, rank, "fsdp float32 + float64", cls=TinyMixed,
                collectives={FAdam: [(18,)], FAdafactor: [(37,), (10,)]})


def fsdp_chunks(backend, rank, world):
    """Tensors of several chunks per shard: the C++ backend's chunk set to 4 elements."""
    import pytest
    from conftest import set_chunk  # the one place tests switch backends

    with pytest.MonkeyPatch.context() as monkeypatch:
        set_chunk(monkeypatch, backend, 4)
        _compare_dp(_fsdp(), backend, world, rank, f"fsdp Shard(0) 4-element chunks {backend}")


def fsdp_batched(backend, rank, world):
    model = _fsdp(cls=TinyBatched)
    assert len(model.batched.to_local()) == (2 if rank == 0 else 1), model.batched.to_local().shape
    _compare_dp(model, backend, world, rank, f"fsdp 3-D batch-sharded {backend}", cls=TinyBatched)


def fsdp_shard1(backend, rank, world):
    from torch.distributed.tensor import Shard
    # FSDP2 refuses uneven dim-1 shards: Shard(1) where dim 1 divides evenly (a.weight, 1 x 6).
    model = _fsdp(placement_fn=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % world == 0
                  else Shard(0))
    assert model.a.weight.placements == (Shard(1),), model.a.weight.placements
    _compare_dp(model, backend, world, rank, f"fsdp Shard(1) {backend}")


def hsdp(backend, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh(DEVICE, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = _fsdp(mesh=mesh)
    assert model.c.weight.placements == (Replicate(), Shard(0)), model.c.weight.placements
    # Two groups: the shard dim carries the flag and the 8 tensors' sums, the replicate dim only
    # the flag (a NaN in one replica skips the step in all).
    _compare_dp(model, backend, world, rank, f"hsdp {backend}",
                collectives={FAdam: [(2,), (18,)], FAdafactor: [(2,), (37,), (2,), (10,)]})


def tp(backend, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    mesh = init_device_mesh(DEVICE, (world,))
    model = make(TPModel)
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    model.extra = nn.Parameter(distribute_tensor(model.extra.data, mesh, [Shard(0)]))
    placements = {n: p.placements if sharded.is_dtensor(p) else None
                  for n, p in model.named_parameters()}
    assert placements == {"up.weight": (Shard(0),), "up.bias": (Shard(0),),
                          "down.weight": (Shard(1),), "down.bias": (Replicate(),),
                          "head.weight": None, "head.bias": None,
                          "extra": (Shard(0),)}, placements
    opt = make_opt(model, backend)
    train(model, opt, STEPS)  # tensor parallel: every rank sees the whole batch
    ref = single_run(TPModel, backend)
    assert_match(snapshot(model, opt), ref, f"tensor parallel {backend}")
    assert_clip_binds(TPModel, backend, ref)
    if OPT is FAdam:
        # One all-reduce: the flag and the sums of the 4 Shard tensors (not down.bias,
        # Replicate).
        assert all_reduce_shapes(model, opt, 0, 1) == [(10,)]
        # With clipping off there is no RMS: the flag alone.
        opt = make_opt(model, backend, clip=None)
        assert all_reduce_shapes(model, opt, 0, 1) == [(2,)]
    else:
        # After phase S: the flag, up.bias's RMS sums (2), and per weight the sums over its
        # split dim and the two totals: up (8 x 6, rows split) 6 column sums + 2, down (6 x 8,
        # columns split) 6 row sums + the sum of g^2 (its old R is whole here), extra (5 x 3,
        # rows split) 3 + 2. After phase A: the flag and the 3 weights' RMS sums.
        assert all_reduce_shapes(model, opt, 0, 1) == [(24,), (8,)]
        opt = make_opt(model, backend, clip=None)
        assert all_reduce_shapes(model, opt, 0, 1) == [(22,), (2,)]


def fsdp_tp(backend, rank, world):
    """2-D: tensor parallel inside, FSDP2 over the data-parallel dim of a (dp, tp) mesh, so a
    tensor is sharded over both dims and its sums are added over each in turn."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    mesh = init_device_mesh(DEVICE, (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = make(TPModel)
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    _fsdp(mesh=mesh["dp"], model=model)
    # up's are (_StridedShard(0), Shard(0)), down.weight (Shard(0), Shard(1)).
    both = [n for n, p in model.named_parameters()
            if not any(pl.is_replicate() for pl in p.placements) and len(p.placements) == 2]
    assert "up.weight" in both and "down.weight" in both, both
    dp_rank, dp_world = mesh["dp"].get_local_rank(), 2
    # Two all-reduces, dp then tp: on dp the flag and the 7 tensors' sums, on tp the flag and
    # up.weight, up.bias and down.weight (down.bias is Replicate on tp).
    _compare_dp(model, backend, dp_world, dp_rank, f"fsdp + tp {backend}", cls=TPModel,
                collectives={FAdam: [(16,), (8,)]})


def errors(backend, rank, world):
    """A DTensor parameter with a plain gradient: an error naming it, and nothing changed."""
    model = _fsdp()
    opt = make_opt(model, backend)
    x, y = data(0)
    nn.functional.mse_loss(model(x), y).backward()
    model.c.weight.grad = torch.zeros_like(model.c.weight.full_tensor())
    before = _local_snapshot(model, opt)
    try:
        opt.step()
    except RuntimeError as exc:
        assert "parameter 4 of its param group" in str(exc) and "plain tensor" in str(exc), exc
    else:
        raise AssertionError("a plain gradient of a DTensor parameter was accepted")
    after = _local_snapshot(model, opt)
    assert before.keys() == after.keys() and not any(opt.state.values())
    assert all(torch.equal(before[k], after[k]) for k in before)


def bad_grad_one_rank(backend, rank, world):
    """A bad gradient on the last rank only: every rank raises, the last one naming the
    parameter, nothing changes on any rank, and no rank waits for another (the refusal travels
    in the step's all-reduce); the next step runs everywhere."""
    model = _fsdp()
    opt = make_opt(model, backend)
    train(model, opt, 2, rank=rank, world=world)
    before = {k: v.clone() for k, v in _local_snapshot(model, opt).items()}
    x, y = data(2)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    if rank == world - 1:  # a plain gradient (built locally: full_tensor() is a collective)
        model.c.weight.grad = torch.zeros(model.c.weight.shape)
    try:
        opt.step()
    except RuntimeError as exc:
        if rank == world - 1:
            assert "parameter 4 of its param group" in str(exc), exc
        elif DEVICE == "cpu":  # gloo: the count of refusing ranks is read on the host
            assert "refused on another rank" in str(exc), exc
    else:
        if DEVICE == "cpu" or rank == world - 1:
            raise AssertionError(f"rank {rank} stepped past a refusal")
    after = _local_snapshot(model, opt)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed on rank {rank}"
    train(model, opt, 1, start=3, rank=rank, world=world)
    assert not torch.equal(before["d.weight"], _local_snapshot(model, opt)["d.weight"])


def ddp(backend, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(make(Tiny))
    _compare_dp(model, backend, world, rank, f"ddp {backend}")


def zero(backend, rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(make(Tiny))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=OPT, **HYPER,
                                  backend=backend)  # FAdam's and FAdafactor's arguments
    train(model, opt, STEPS, rank=rank, world=world)
    ref = single_run(Tiny, backend)
    got = {n.replace("module.", ""): p.detach().clone() for n, p in model.named_parameters()}
    assert_match(got, {k: v for k, v in ref.items() if "." not in k.split(".", 1)[1]},
                 f"zero {backend}")
    # Each rank holds the state of its own whole tensors.
    names = {p: n.replace("module.", "") for n, p in model.named_parameters()}
    held = [(names[p], s) for p, s in opt.optim.state.items()]
    assert held, "this rank holds no state"
    for name, state in held:
        assert state.keys() == {k.split(".")[-1] for k in ref if k.startswith(f"{name}.")}
        for key in state:
            torch.testing.assert_close(state[key], ref[f"{name}.{key}"], rtol=RTOL, atol=ATOL)


def nonfinite(backend, rank, world):
    """A NaN in one rank's gradient shard: every rank skips, everything stays bit-identical."""
    model = _fsdp()
    opt = make_opt(model, backend)
    train(model, opt, 2, rank=rank, world=world)
    before = {k: v.clone() for k, v in _local_snapshot(model, opt).items()}
    x, y = data(2)
    nn.functional.mse_loss(model(x), y).backward()
    if rank == world - 1:
        model.d.weight.grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    after = _local_snapshot(model, opt)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed on rank {rank}"
    assert opt.skipped_steps.item() == 1.0, opt.skipped_steps
    # The next step runs again.
    train(model, opt, 1, start=3, rank=rank, world=world)
    assert opt.skipped_steps.item() == 1.0
    assert not torch.equal(before["d.weight"], _local_snapshot(model, opt)["d.weight"])


def _local_snapshot(model, opt):
    out = {}
    for name, p in model.named_parameters():
        out[name] = sharded.local(p.detach()).clone()
        for key, value in opt.state[p].items():
            out[f"{name}.{key}"] = sharded.local(value).clone()
    return out


def triton_fsdp(backend, rank, world):
    """The Triton kernels (interpreted on CPU tensors, or compiled on GPUs) on FSDP2 Shard(0)
    with empty shards."""
    _compare_dp(_fsdp(), "triton", world, rank, "fsdp Shard(0) triton")


# -------------------------------------------------------------------------------------------------
# Checkpoints (torch.distributed.checkpoint)

def _state(model, opt):
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _load(model, opt, path, no_dist=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = _state(model, opt)
    dcp.load(state, checkpoint_id=path, no_dist=no_dist)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def checkpoint(backend, rank, world):
    """Save after 4 steps, resume in a fresh model and optimizer: the same as 8 steps at once.
    Also writes the 2-rank checkpoint and the uninterrupted result for the one-process load of
    test_sharded.py, and loads the one-process checkpoint it wrote (CKPT_DIR/one)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    root = os.environ["CKPT_DIR"]
    model = _fsdp()
    opt = make_opt(model, backend)
    train(model, opt, 4, rank=rank, world=world)
    name = f"{backend}-{OPT.__name__}"
    dcp.save(_state(model, opt), checkpoint_id=os.path.join(root, f"two-{name}"))
    train(model, opt, 4, start=4, rank=rank, world=world)
    uninterrupted = snapshot(model, opt)

    torch.manual_seed(123)  # other weights, to be overwritten
    model = _fsdp()
    opt = make_opt(model, backend)
    _load(model, opt, os.path.join(root, f"two-{name}"))
    train(model, opt, 4, start=4, rank=rank, world=world)
    assert_match(snapshot(model, opt), uninterrupted, f"resumed {backend}", rtol=0, atol=0)
    if rank == 0:
        torch.save(uninterrupted, os.path.join(root, f"two-{name}-final.pt"))

    # A plain (one-process) optimizer.state_dict() loads into the sharded optimizer, each rank
    # keeping its shard of the whole tensors.
    plain_model = make(Tiny)
    plain_opt = make_opt(plain_model, backend, one_process=True)
    train(plain_model, plain_opt, 4)
    model = _fsdp(model=copy.deepcopy(plain_model))
    opt = make_opt(model, backend)
    opt.load_state_dict(plain_opt.state_dict())
    train(model, opt, 4, start=4, rank=rank, world=world)
    assert_match(snapshot(model, opt), single_run(Tiny, backend), f"plain -> sharded {backend}")

    one = os.path.join(root, f"one-{name}")
    if os.path.exists(one):
        model = _fsdp()
        opt = make_opt(model, backend)
        _load(model, opt, one)
        train(model, opt, 4, start=4, rank=rank, world=world)
        assert_match(snapshot(model, opt), single_run(Tiny, backend), f"1 -> 2 ranks {backend}")
    dist.barrier()


def save_one_process(root, backend, optimizer="fadam"):
    """One process, no process group: 4 steps, then a DCP checkpoint at
    root/one-<backend>-<optimizer class>."""
    global OPT
    OPT = OPTIMIZERS[optimizer]
    import torch.distributed.checkpoint as dcp
    model = make(Tiny)
    opt = make_opt(model, backend)
    train(model, opt, 4)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(_state(model, opt), no_dist=True,
                 checkpoint_id=os.path.join(root, f"one-{backend}-{OPT.__name__}"))


def load_two_rank_checkpoint(root, backend, optimizer="fadam"):
    """One process: load the 2-rank checkpoint, 4 more steps; returns (got, the 2-rank result)."""
    global OPT
    OPT = OPTIMIZERS[optimizer]
    model = make(Tiny)
    opt = make_opt(model, backend)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        _load(model, opt, os.path.join(root, f"two-{backend}-{OPT.__name__}"), no_dist=True)
    train(model, opt, 4, start=4)
    final = os.path.join(root, f"two-{backend}-{OPT.__name__}-final.pt")
    return snapshot(model, opt), torch.load(final, map_location="cpu")


def stochastic(backend, rank, world):
    """bfloat16 parameters with stochastic rounding and bfloat16 momentums, sharded as FSDP2
    (Shard(0)) and tensor parallel (Shard(1)) do, unevenly: the same bits as one process, since
    each element draws the bits of its place in the logical tensor. Clipping is off, so every
    element's float32 math is local (the RMS sums of a sharded tensor add up in another order).
    AdaFisher's parameters belong to no layer (F = 1): its math is element-wise anyway."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh(DEVICE, (world,))
    gen = torch.Generator().manual_seed(0)
    layout = [((7, 5), Shard(0)), ((3, 9), Shard(1)), ((11,), Shard(0)), ((2, 3, 5), Shard(1))]
    fulls = [torch.randn(shape, generator=gen).bfloat16() for shape, _ in layout]
    grads = [[torch.randn(shape, generator=gen).bfloat16() for shape, _ in layout]
             for _ in range(4)]

    def run(params, place, rounding="stochastic"):
        kw = dict(lr=1e-2, backend=backend, bf16_rounding=rounding, rounding_seed=42,
                  momentum_dtype=torch.bfloat16)
        opt = (AdaFisher(nn.Module(), params, **kw) if OPT is AdaFisher
               else OPT(params, clip=None, **kw))
        for step in grads:
            for p, g in zip(params, step):
                p.grad = place(g.to(DEVICE), p)
            opt.step()
        return opt

    shards = [nn.Parameter(distribute_tensor(f.to(DEVICE), mesh, [pl]))
              for f, (_, pl) in zip(fulls, layout)]
    opt = run(shards, lambda g, p: distribute_tensor(g, mesh, p.placements))
    whole = [nn.Parameter(f.clone().to(DEVICE)) for f in fulls]
    one = run(whole, lambda g, p: g)
    for a, b in zip(shards, whole):
        assert torch.equal(a.full_tensor(), b.detach()), a.placements
        for key in opt.state[a]:
            assert torch.equal(full(opt.state[a][key]), one.state[b][key]), (key, a.placements)
    nearest = [nn.Parameter(f.clone().to(DEVICE)) for f in fulls]
    run(nearest, lambda g, p: g, rounding="nearest")
    assert any(not torch.equal(a.detach(), b.detach()) for a, b in zip(whole, nearest))


SCENARIOS = {f.__name__: f for f in (fsdp_shard0, fsdp_mixed_dtypes, fsdp_chunks, fsdp_shard1,
                                      fsdp_batched, hsdp, fsdp_tp, tp,
                                      ddp, zero, nonfinite, errors, bad_grad_one_rank, triton_fsdp,
                                      checkpoint, stochastic)}


def main(argv):
    import torch.distributed as dist
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    global OPT
    for item in argv:
        name, backend, optimizer = (item.split(":") + ["", ""])[:3]
        OPT = OPTIMIZERS[optimizer or "fadam"]
        try:
            SCENARIOS[name](backend or ("cuda" if DEVICE == "cuda" else "cpu"), rank, world)
            dist.barrier()
        except BaseException:
            print(f"FAIL {item} on rank {rank}:\n{traceback.format_exc()}", flush=True)
            os._exit(1)
        if rank == 0:
            print(f"PASS {item}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
