"""AdaFisher's Triton kernels compiled for sm_80 / sm_90 without a GPU, as tests/_triton_compile.py
does for FAdam's (whose signature derivation and ptxas run this reuses). Run by
tests/test_adafisher_kernels.py in a subprocess without TRITON_INTERPRET.

    .venv/bin/python tests/_adafisher_triton_compile.py [--json] [--arch=80]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _triton_compile import (_chunk, _tk, _tl_dtypes, aligned_table, launch_ptx,  # noqa: E402
                             report_main, report_rows, rounding_args)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_args(kernel, dtype=torch.float32, aligned=True, gscale=False, lr=None,
                decoupled=False, table=True, sr=False):
    """The argument dict of one launch as _adafisher_ops.py builds it (CPU tensors stand in for
    device tensors: only dtypes and 16-byte alignment matter to the specialization)."""
    tk = _tk()
    ao, ak, launch = tk._adafisher_ops, tk._adafisher_kernels, tk.launch
    t32 = lambda n=64: torch.zeros(n, dtype=torch.float32)  # noqa: E731
    x = torch.zeros(64, dtype=dtype)
    common = dict(DTYPE=_tl_dtypes()[dtype], TABLE=table, ALIGNED=aligned and table,
                  BLOCK=launch.BLOCK, num_warps=launch.NUM_WARPS,
                  gscale=t32(1) if gscale else None, HAS_GSCALE=gscale, skip=t32(1),
                  chunk_size=_chunk())
    if kernel == "check":
        operands = (dict(meta=torch.zeros(64, dtype=torch.int64), n_tensors=300, blocks=600,
                         **ao._Check.no_operands) if table else
                    dict(meta=None, n_tensors=0, blocks=0, g_in=x, numel_in=4097))
        return ak._check_kernel, dict(**operands, **common)
    rounding = rounding_args(sr, table)  # sr: a bfloat16 theta and momentum, both stochastic
    mom = torch.zeros(64, dtype=torch.bfloat16) if sr else t32()
    operands = (dict(meta=torch.zeros(64, dtype=torch.int64), n_tensors=300, blocks=2400,
                     **ao._Update.no_operands) if table else
                dict(meta=None, n_tensors=0, blocks=0, p_in=x, g_in=x, m_in=mom,
                     step_in=torch.zeros(()), numel_in=4097, s_in=3, h_in=40, cols_in=37,
                     rnd_in=rounding["rnd_in"]))
    rounding.pop("rnd_in")
    return ak._update_kernel, dict(
        **operands, **common, factors=t32(), lr_ptr=None if lr is None else torch.zeros(1, dtype=lr),
        lr64=1e-3, beta64=0.9, beta=0.9, omb=0.1, wd=1e-2, damping=1e-3, sign=1.0,
        HAS_LR=lr is not None, DECOUPLED=decoupled, INTERPRET=False, **rounding)


def specializations():
    """(kernel, spec) pairs: the check per dtype (table and per-tensor), the update per dtype
    aligned and not, decoupled with grad_scale and a float64 lr, and the per-tensor path; and the
    bfloat16 update with stochastic rounding of theta and a bfloat16 momentum (table and
    per-tensor)."""
    out = []
    for dt in DTYPES:
        out.append(("check", dict(dtype=dt)))
        out.append(("check", dict(dtype=dt, gscale=True, table=False)))
        out.append(("update", dict(dtype=dt)))
        out.append(("update", dict(dtype=dt, aligned=False)))
        out.append(("update", dict(dtype=dt, decoupled=True, gscale=True, lr=torch.float64)))
        out.append(("update", dict(dtype=dt, decoupled=True, lr=torch.float32, table=False)))
    out.append(("update", dict(dtype=torch.bfloat16, sr=True)))
    out.append(("update", dict(dtype=torch.bfloat16, sr=True, table=False)))
    return out


def describe(kernel, spec):
    parts = [kernel, str(spec.get("dtype", torch.float32)).replace("torch.", "")]
    if not spec.get("aligned", True):
        parts.append("unaligned")
    for key, word in (("decoupled", "decoupled"), ("gscale", "grad_scale"), ("sr", "stochastic")):
        if spec.get(key):
            parts.append(word)
    if spec.get("lr") is not None:
        parts.append("lr_" + str(spec["lr"]).replace("torch.", ""))
    if not spec.get("table", True):
        parts.append("per-tensor")
    return " ".join(parts)


def compile_ptx(kernel, arch, **spec):
    return launch_ptx(*launch_args(kernel, **spec), arch)


def report(archs):
    return report_rows(archs, specializations(), compile_ptx, describe, aligned_table)


def _main(argv):
    report_main(argv, report)


if __name__ == "__main__":
    _main(sys.argv[1:])
