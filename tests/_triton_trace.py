"""Traces one FAdam step of the Triton ops the way torch.compile's AOTAutograd does (FakeTensors on
a fake CUDA device under FunctionalTensorMode), without a GPU, and prints what the graph holds as
JSON. Run by tests/test_triton.py in a subprocess without TRITON_INTERPRET: the kernels must be
JITFunctions for wrap_triton, which the interpreted ones in the test process are not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from functorch.compile import aot_function  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from _triton_helpers import triton_kernels  # noqa: E402

TK = triton_kernels()
SHAPES = [(TK.CHUNK_SIZE + 4464,), (10,), (0,)]  # 2 chunks, 1 fused chunk, empty


def step(params, grads, fims, moms, steps, partials, skip, lr_tensor):
    TK.phase_a(params, grads, fims, steps, partials, skip, None, beta2=0.999, eps=1e-8, p=0.5,
               clip=1.0, maximize=False, chunk_size=TK.CHUNK_SIZE, fuse_one_chunk=True)
    TK.phase_b(params, grads, fims, moms, steps, partials, skip, None, lr_tensor, lr=0.0,
               beta1=0.9, beta2=0.999, eps=1e-8, p=0.5, clip=1.0, weight_decay=1e-3,
               maximize=False, chunk_size=TK.CHUNK_SIZE, fuse_one_chunk=True)


def main():
    graphs = []

    def fw_compiler(gm, _inputs):
        graphs.append(gm)
        return gm

    with FakeTensorMode():
        mk = lambda: [torch.zeros(s, device="cuda") for s in SHAPES]  # noqa: E731
        params, grads, fims, moms = mk(), mk(), mk(), mk()
        steps = [torch.ones((), device="cuda") for _ in SHAPES]
        partials = torch.zeros(4, 2, dtype=torch.float64, device="cuda")
        skip = torch.zeros(1, device="cuda")
        lr = torch.full((), 1e-3, device="cuda")
        aot_function(step, fw_compiler=fw_compiler)(params, grads, fims, moms, steps, partials,
                                                    skip, lr)
    nodes = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    print(json.dumps([{"grid": [list(g) for g in n.kwargs["grid"]],
                       "table": n.kwargs["kwargs"].get("TABLE"),
                       "numel": n.kwargs["kwargs"].get("numel_in")} for n in nodes]))


if __name__ == "__main__":
    main()
