"""The FAdafactor Triton kernels compiled for sm_80 / sm_90 without a GPU, as tests/_triton_compile.py
does for FAdam's (whose signature derivation and ptxas run this reuses). Run by
tests/test_fadafactor_triton.py in a subprocess without TRITON_INTERPRET.

    .venv/bin/python tests/_fadafactor_triton_compile.py [--json] [--arch=80]
    .venv/bin/python tests/_fadafactor_triton_compile.py --trace   # torch.compile's kernel calls
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _triton_compile import (_chunk, _tk, _tl_dtypes, aligned_table, launch_ptx,  # noqa: E402
                             report_main, report_rows, rounding_args)
from _triton_compile import describe as _describe  # noqa: E402


def launch_args(kernel, dtype=torch.float32, aligned=True, sqrt=True, gscale=False, lr=None,
                table=True, sr=False):
    """The argument dict of one launch as _fadafactor_ops.py builds it (CPU tensors stand in for
    device tensors: only dtypes and 16-byte alignment matter to the specialization)."""
    tk = _tk()
    fo, fk, launch = tk._fadafactor_ops, tk._fadafactor_kernels, tk.launch
    chunk = _chunk()
    t32 = lambda n=64: torch.zeros(n, dtype=torch.float32)  # noqa: E731
    if table:
        operands = dict(meta=torch.zeros(64, dtype=torch.int64), n_tensors=300, blocks=4500,
                        **fo._Call.no_operands)
    else:
        x = torch.zeros(64, dtype=dtype)
        operands = dict(meta=None, n_tensors=0, blocks=0, p_in=x, g_in=x, m_in=t32(),
                        rs_in=t32(), cs_in=t32(), step_in=torch.zeros(()), numel_in=4097,
                        batch_in=3, rows_in=37, cols_in=41, tile_r_in=37, tile_c_in=41,
                        slot_in=3, fpart_in=5, fac_in=7)
    common = dict(DTYPE=_tl_dtypes()[dtype], TABLE=table, num_warps=launch.NUM_WARPS)
    if kernel == "tiles":
        tile_c = fo.tile_cols_block(chunk)
        return fk._tiles_kernel, dict(
            **operands, factor_partials=torch.zeros(8, dtype=torch.float64), skip=t32(1),
            gscale=t32(1) if gscale else None, sign=1.0, HAS_GSCALE=gscale, TILE_C=tile_c,
            S_ROWS=max(1, fo.S_BLOCK // tile_c), **common)
    if kernel == "combine":
        return fk._combine_kernel, dict(
            **operands, factor_partials=torch.zeros(8, dtype=torch.float64), factors=t32(),
            skip=t32(1), beta2=0.999, INTERPRET=False, C_BLOCK=fo.C_BLOCK, **common)
    elem = dict(factors=t32(), partials=torch.zeros(8, 2, dtype=torch.float64),
                gscale=t32(1) if gscale else None, p=0.5, eps_p=1e-8, sign=1.0, chunk_size=chunk,
                HAS_GSCALE=gscale, SQRT=sqrt, ALIGNED=aligned and table, INTERPRET=False,
                BLOCK=launch.block_for(0.5 if sqrt else 0.75))
    if kernel == "A":
        return fk._phase_a_kernel, dict(**operands, **elem, **common)
    return fk._phase_b_kernel, dict(
        **operands, **elem, skip=t32(1), lr_ptr=None if lr is None else torch.zeros(1, dtype=lr),
        lr=1e-3, beta1=0.9, omb1=0.1, clip=1.0, wd=1e-3, fuse_one_chunk=True,
        HAS_LR=lr is not None, SLOT_BLOCK=launch.SLOT_BLOCK, **common,
        **rounding_args(sr, table))


def specializations():
    """(kernel, spec) pairs: every dtype of every kernel on the table path (aligned and not for
    the element kernels), the heaviest element variants (pow path, grad_scale, float64 lr), and
    the per-tensor (traced) path."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    out = []
    for dt in dtypes:
        out.append(("tiles", dict(dtype=dt)))
        out.append(("tiles", dict(dtype=dt, gscale=True, table=False)))
        for kernel, al in itertools.product("AB", (True, False)):
            out.append((kernel, dict(dtype=dt, aligned=al)))
        out.append(("A", dict(dtype=dt, sqrt=False, gscale=True)))
        out.append(("B", dict(dtype=dt, sqrt=False, gscale=True, lr=torch.float64)))
        out.append(("B", dict(dtype=dt, aligned=False, gscale=True, lr=torch.float32,
                              table=False)))
    out.append(("B", dict(dtype=torch.bfloat16, sr=True)))  # stochastic rounding
    out.append(("combine", dict()))
    out.append(("combine", dict(table=False)))
    return out


def describe(kernel, spec):
    return _describe(kernel, spec, label=kernel)


def compile_ptx(kernel, arch, **spec):
    return launch_ptx(*launch_args(kernel, **spec), arch)


def _aligned(kernel, spec):
    """The element kernels (A, B), aligned on the table path and on the sqrt path: the
    specializations expected to load 128 bits at a time."""
    return kernel in "AB" and aligned_table(kernel, spec) and spec.get("sqrt", True)


def report(archs):
    return report_rows(archs, specializations(), compile_ptx, describe, _aligned)


def trace():
    """The Triton kernel calls in the AOTAutograd graph of one FAdafactor step (the three ops)
    over a (2, 3, 5) and an (80, 1000) tensor (two chunks) and a (0, 4) one, traced on
    FakeTensors of a fake CUDA device: [{kernel, grid, table, numel}]."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fadam_fused import op_contract

    tk, chunk = _tk(), _chunk()
    shapes = [(2, 3, 5), (80, 1000), (0, 4)]
    ops = torch.ops.fadam_fused

    def step(params, grads, rows, cols, moms, steps, fparts, factors, partials, skip, lr_tensor):
        ops.triton_fadafactor_phase_s(params, grads, rows, cols, steps, fparts, factors, skip,
                                      None, beta2=0.999, maximize=False, chunk_size=chunk)
        ops.triton_fadafactor_phase_a(params, grads, factors, partials, None, eps=1e-8, p=0.5,
                                      clip=1.0, maximize=False, chunk_size=chunk,
                                      fuse_one_chunk=True)
        ops.triton_fadafactor_phase_b(params, grads, rows, cols, moms, steps, factors, partials,
                                      skip, None, lr_tensor, lr=0.0, beta1=0.9, eps=1e-8, p=0.5,
                                      clip=1.0, weight_decay=1e-3, maximize=False,
                                      chunk_size=chunk, fuse_one_chunk=True)

    graphs = []

    def fw_compiler(gm, _inputs):
        graphs.append(gm)
        return gm

    assert tk is not None
    with FakeTensorMode():
        mk = lambda: [torch.zeros(s, device="cuda") for s in shapes]  # noqa: E731
        params, grads, moms = mk(), mk(), mk()
        rows = [torch.ones(s[:-1], device="cuda") for s in shapes]
        cols = [torch.ones(s[:-2] + s[-1:], device="cuda") for s in shapes]
        steps = [torch.ones((), device="cuda") for _ in shapes]
        fparts, factors = op_contract.new_factor_buffers(params, chunk)
        partials = op_contract.new_partials(params, chunk)
        skip = torch.zeros(1, device="cuda")
        lr = torch.full((), 1e-3, device="cuda")
        aot_function(step, fw_compiler=fw_compiler)(params, grads, rows, cols, moms, steps,
                                                    fparts, factors, partials, skip, lr)
    nodes = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return [{"kernel": kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__,
             "grid": [list(g) for g in n.kwargs["grid"]], "table": n.kwargs["kwargs"].get("TABLE"),
             "numel": n.kwargs["kwargs"].get("numel_in")} for n in nodes]


def _main(argv):
    report_main(argv, report, trace)


if __name__ == "__main__":
    _main(sys.argv[1:])
