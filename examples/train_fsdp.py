"""The char-level language model of train_char_lm.py, sharded with FSDP2 and trained with FAdam
or FAdafactor.

    .venv/bin/torchrun --nproc_per_node 2 examples/train_fsdp.py            # CPU (gloo), or GPUs
    .venv/bin/torchrun --nproc_per_node 2 examples/train_fsdp.py --optimizer fadafactor \
        --steps 50 --compare                                                   # vs one process

(`torchrun` is `python -m torch.distributed.run` of the Python that has torch: `.venv/bin/` after
`make test` or `make bench`.)

Each rank holds a shard of every parameter and of its optimizer state (momentum, and fim or
FAdafactor's row and column sums) and trains on its own batches. The optimizers need nothing
FSDP-specific: given DTensor parameters they all-reduce the sums they need (the per-tensor sums
of squares of the clipping, FAdafactor's row and column sums) with the skip flag, so the run
follows the one-process algorithm (fadam_fused/sharded.py). --compare shows it: rank 0 also
trains an unsharded copy on the batches of every rank and prints how far its loss is from the
sharded run's. GPUs are used when every rank has one.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

# train_char_lm.py sits beside this file (and puts the checkout on sys.path when needed).
from train_char_lm import CharTransformer, FAdafactor, FAdam, batches, load_corpus

OPTIMIZERS = {"fadam": FAdam, "fadafactor": FAdafactor}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fadam")
    ap.add_argument("--compare", action="store_true",
                    help="rank 0 also trains an unsharded copy on every rank's batches and "
                         "prints the largest difference of the two runs' losses")
    args = ap.parse_args(argv)

    # The logits are a view (nn.Linear on 3-D input) and are never modified in place, which is
    # what FSDP2 warns about on every forward.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    if "RANK" not in os.environ:
        raise SystemExit(f"run me with torchrun, e.g. {sys.executable} -m torch.distributed.run "
                         f"--nproc_per_node 2 {' '.join(sys.argv)}")
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ["LOCAL_WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    text = load_corpus()
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    data_train, data_val = data[:split], data[split:]

    torch.manual_seed(args.seed)  # the same initial weights on every rank, then sharded
    model = CharTransformer(len(itos), args.context).to(device)
    single = copy.deepcopy(model) if args.compare and rank == 0 else None
    for block in model.blocks.layers:
        fully_shard(block)
    fully_shard(model)
    # The defaults are the paper's (clip 1.0, weight_decay 1e-3); nothing sharding-specific.
    optimizer = OPTIMIZERS[args.optimizer]
    opt = optimizer(model.parameters(), lr=args.lr)
    single_opt = None if single is None else optimizer(single.parameters(), lr=args.lr)

    # Each rank its own batches; the validation batches are the same everywhere.
    streams = [batches(data_train, args.batch, args.context,
                       torch.Generator().manual_seed(args.seed + 1 + r)) for r in range(world)]
    val_stream = batches(data_val, args.batch, args.context,
                         torch.Generator().manual_seed(args.seed + 2))
    val_batches = [next(val_stream) for _ in range(4)]
    if rank == 0:
        print(f"{world} ranks on {device.type}, {sum(p.numel() for p in model.parameters())} "
              f"parameters sharded with FSDP2, {optimizer.__name__}; {args.steps} steps of "
              f"{world} x {args.batch} sequences of {args.context} characters", flush=True)

    start = time.perf_counter()
    largest = 0.0  # --compare: the largest |sharded loss - one-process loss| so far
    for step in range(1, args.steps + 1):
        every = [next(s) for s in streams]  # every rank draws all, to keep the streams aligned
        x, y = (t.to(device) for t in every[rank])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.compare:
            # The data-parallel loss is the mean over ranks; the one-process run sees all the
            # batches at once (the same mean, the same gradient).
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if single is not None:
                xs, ys = (torch.cat(t).to(device) for t in zip(*every))
                one = F.cross_entropy(single(xs).flatten(0, 1), ys.flatten())
                single_opt.zero_grad(set_to_none=True)
                one.backward()
                single_opt.step()
                largest = max(largest, abs(mean.item() / world - one.item()))
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():  # every rank runs the forward: FSDP2 all-gathers the weights
                model.eval()
                val = sum(F.cross_entropy(model(vx.to(device)).flatten(0, 1),
                                          vy.to(device).flatten()).item()
                          for vx, vy in val_batches) / len(val_batches)
                model.train()
            if rank == 0:
                print(f"  step {step:>5}  train {loss.item():.3f}  val {val:.3f}", flush=True)
    if rank == 0:
        skipped = 0 if opt.skipped_steps is None else int(opt.skipped_steps.item())
        print(f"done in {time.perf_counter() - start:.1f} s; steps skipped for non-finite "
              f"gradients: {skipped}", flush=True)
        if single is not None:
            print(f"largest |sharded - one-process| training loss over {args.steps} steps: "
                  f"{largest:.2e}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
