"""Swap AdamW for FAdam on a tiny character-level language model, and compare the loss curves.

The model is a 2-layer transformer (0.45M parameters) that learns to continue Python source code.
Its training text is the source of a few standard-library modules, read from this Python's own
installation, so nothing is downloaded. Both runs start from the same weights and see the same
batches, so the curves differ only by the optimizer.

    .venv/bin/python examples/train_char_lm.py             # 300 steps per optimizer, 1-2 min on 2 cores
    .venv/bin/python examples/train_char_lm.py --steps 5   # a smoke run in seconds
    .venv/bin/python examples/train_char_lm.py --optimizers adamw,fadam,fadafactor
    .venv/bin/python examples/train_char_lm.py --optimizer adafisher   # takes the model, not its parameters
    .venv/bin/python examples/train_char_lm.py --optimizers fadam,fadam_bf16,fadam_bf16_sr --lr 1e-4

The last compares pure bfloat16 training (weights, activations, gradients and momentum in
bfloat16; no float32 master copy) with round-to-nearest updates (fadam_bf16), which stall once an
update is below half a bfloat16 ulp of its weight, and with stochastic rounding
(fadam_bf16_sr: bf16_rounding="stochastic", momentum_dtype=torch.bfloat16), against float32
weights (fadam).

The plot is named after the optimizers that ran (examples/out/char_lm_loss_adamw_fadam.png by
default), so a run of one optimizer does not overwrite a comparison. The time printed per
optimizer is that of its training steps from step 2 on: step 1 (the first call of every kernel,
the state allocation) and the evaluations are not timed, so the first optimizer run does not pay
for the process's warm-up.

The only FAdam-specific line is the optimizer constructor: FAdam takes AdamW's arguments (lr, betas,
eps, weight_decay) and works with LR schedulers, zero_grad, state_dict, like any torch optimizer.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from fadam_fused import AdaFisher, AdaFisherW, FAdafactor, FAdam
except ImportError:  # running from a checkout without `pip install -e .`: use the checkout's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fadam_fused import AdaFisher, AdaFisherW, FAdafactor, FAdam

OPTIMIZERS = ("adamw", "fadam", "fadafactor", "adafisher", "adafisherw")

# Modules whose source makes the corpus: ~420 KB of Python with docstrings on CPython 3.11, all in
# every CPython 3.10+ install (a missing one is skipped, so a trimmed stdlib still works).
STDLIB_MODULES = ["textwrap.py", "string.py", "functools.py", "heapq.py", "bisect.py", "fnmatch.py",
                  "glob.py", "shlex.py", "fractions.py", "statistics.py", "dataclasses.py",
                  "argparse.py", "pprint.py", "copy.py", "random.py"]


def load_corpus() -> str:
    """The concatenated source of STDLIB_MODULES, from this interpreter's standard library."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in STDLIB_MODULES:
        path = os.path.join(stdlib, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                parts.append(f.read())
    if not parts:
        raise SystemExit(f"none of {STDLIB_MODULES} found under {stdlib}")
    return "\n".join(parts)


class CharTransformer(nn.Module):
    """Token + position embeddings, pre-norm transformer blocks with a causal mask, a linear head."""

    def __init__(self, vocab: int, context: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        mask = nn.Transformer.generate_square_subsequent_mask(context)  # -inf above the diagonal
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    """Endless random windows of `context` characters and the same windows shifted by one."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        yield x, y


@torch.no_grad()
def evaluate(model: nn.Module, val_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
              for x, y in val_batches]
    model.train()
    return sum(losses) / len(losses)


# Pure bfloat16 runs: the model is bfloat16 and FAdam writes it without a float32 copy.
BF16 = {"fadam_bf16": dict(bf16_rounding="nearest"),
        "fadam_bf16_sr": dict(bf16_rounding="stochastic", rounding_seed=0,
                              momentum_dtype=torch.bfloat16)}
NAMES = (*OPTIMIZERS, *BF16)


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = model.parameters()
    if name in BF16:
        return FAdam(params, lr=lr, **BF16[name])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)  # weight_decay 0.01, torch's default
    # AdaFisher takes the model: it hooks its Linear and LayerNorm layers to measure their Fisher
    # factors (every 100 steps by default, the published TCov; the attention's packed in_proj
    # weight and the embeddings belong to no such layer and get F = 1, momentum alone).
    if name == "adafisher":
        return AdaFisher(model, lr=lr)
    if name == "adafisherw":  # decoupled weight decay, the published AdaFisherW's 0.01
        return AdaFisherW(model, lr=lr, weight_decay=0.01)
    # FAdam's defaults are the paper's: betas (0.9, 0.999), clip 1.0, weight_decay 1e-3 (applied as
    # a natural gradient, so it is not comparable number-for-number with AdamW's 0.01).
    if name == "fadafactor":  # the same arguments; about half of FAdam's optimizer-state memory
        return FAdafactor(params, lr=lr)
    return FAdam(params, lr=lr)


def train(name: str, args, data_train, val_batches, vocab: int) -> dict:
    torch.manual_seed(args.seed)  # same initial weights for every optimizer
    model = CharTransformer(vocab, args.context)
    if name in BF16:
        model = model.to(torch.bfloat16)
    opt = make_optimizer(name, model, args.lr)
    # Linear warmup over the first 10% of steps, then cosine decay to 10% of lr.
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else
        0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    stream = batches(data_train, args.batch, args.context, torch.Generator().manual_seed(args.seed + 1))
    history = {"step": [], "train": [], "val": []}
    timed = 0.0  # training steps 2..steps: step 1 carries the first-call warm-up
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        x, y = next(stream)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step > 1:
            timed += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, val_batches)
            history["step"].append(step)
            history["train"].append(loss.item())
            history["val"].append(val)
            print(f"  {name:<6} step {step:>5}  train {loss.item():.3f}  val {val:.3f}", flush=True)
    history["seconds"] = timed
    history["model"] = model
    return history


@torch.no_grad()
def sample(model: CharTransformer, prompt: str, stoi: dict, itos: list, n: int, seed: int) -> str:
    """Continue `prompt` by n characters, sampling at temperature 0.8."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([[stoi.get(c, 0) for c in prompt]])
    model.eval()
    for _ in range(n):
        logits = model(idx[:, -model.context:])[0, -1].float() / 0.8
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        idx = torch.cat([idx, nxt[None]], dim=1)
    return "".join(itos[i] for i in idx[0].tolist())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate for both (default 1e-3)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=64, help="characters per training window")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches (default 8)")
    ap.add_argument("--sample-chars", type=int, default=120, help="characters each model writes at the end")
    ap.add_argument("--seed", type=int, default=0)
    # --optimizer too: the spelling people type for a single one.
    ap.add_argument("--optimizers", "--optimizer", dest="optimizers", default="adamw,fadam",
                    help=f"comma list of {', '.join(NAMES)} (default adamw,fadam)")
    ap.add_argument("--plot", default=None,
                    help="PNG path ('' for none; default examples/out/char_lm_loss_<optimizers>.png)")
    args = ap.parse_args(argv)
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for name in names:
        if name not in NAMES:
            raise SystemExit(f"unknown optimizer {name!r}; use {', '.join(NAMES)}")
    if args.plot is None:
        args.plot = f"examples/out/char_lm_loss_{'_'.join(names)}.png"

    text = load_corpus()
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))  # the last 10% is held out for validation
    data_train, data_val = data[:split], data[split:]
    vgen = torch.Generator().manual_seed(args.seed + 2)
    val_stream = batches(data_val, args.batch, args.context, vgen)
    val_batches = [next(val_stream) for _ in range(args.eval_batches)]  # fixed validation set
    print(f"corpus: {len(text) / 1e3:.0f} K characters of stdlib source, vocabulary {len(itos)}; "
          f"{args.steps} steps of {args.batch} x {args.context} characters per optimizer")

    runs = {}
    for name in names:
        print(f"{name}:")
        runs[name] = train(name, args, data_train, val_batches, len(itos))

    print(f"\nfinal validation loss (nats/char), and the time of training steps 2-{args.steps} "
          "(step 1 and the evaluations not timed):")
    for name, h in runs.items():
        print(f"  {name:<10} {h['val'][-1]:.3f}   ({h['seconds']:.1f} s)")
    for name, h in runs.items():
        text_out = sample(h["model"], "def ", stoi, itos, args.sample_chars, args.seed)
        print(f"\n--- {name} continues 'def ' ---\n{text_out}")

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")  # writes a file; no display needed
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for name, h in runs.items():
            line, = ax.plot(h["step"], h["val"], label=f"{name} val")
            ax.plot(h["step"], h["train"], ls="--", alpha=0.6, color=line.get_color(), label=f"{name} train")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/char)")
        ax.set_title(f"char-level transformer on stdlib source, lr {args.lr}")
        ax.grid(alpha=0.3)
        # Outside the axes, on the right: the curves fill the plot's corners (high at the start,
        # flat and low at the end, train and val crossing).
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=110, bbox_inches="tight")  # the legend outside included
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
