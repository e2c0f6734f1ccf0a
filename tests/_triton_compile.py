"""What the compiled (not interpreted) Triton kernels become, checked without a GPU. Run by
tests/test_triton_ops.py in subprocesses without TRITON_INTERPRET: compilation and wrap_triton need
the JITFunctions, which the interpreted kernels of the test process are not.

Compilation for sm_80 / sm_90: each specialization is described by the launch arguments the host
code (triton_kernels/_ops.py, through launch.py) passes; the signature and the alignment attributes are derived from
them with Triton's own specialization function, so what is compiled here is what the JIT would
compile at that launch. `ptxas -v` (bundled with the triton wheel) then reports registers and
spills.

torch.compile (--trace): one FAdam step of the two ops traced the way AOTAutograd does (FakeTensors
on a fake CUDA device under FunctionalTensorMode), printing the Triton kernel calls the graph holds.

    .venv/bin/python tests/_triton_compile.py [--all]      # the register / spill table
    .venv/bin/python tests/_triton_compile.py --json [--all] [--arch=80]
    .venv/bin/python tests/_triton_compile.py --trace
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ARCHS = (80, 90)


def _tk():
    """fadam_fused.triton_kernels, imported the way the optimizer imports it (installed, or from
    ./triton_kernels in a source checkout: fadam_fused._ext)."""
    from fadam_fused import _ext

    module, reason = _ext.triton_kernels()
    if module is None:
        raise ImportError(reason)
    return module


def _chunk():
    from fadam_fused import op_contract

    return op_contract.CHUNK_SIZE["triton"]


@functools.lru_cache(maxsize=None)
def _tl_dtypes():
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def rounding_args(sr, table):
    """Phase B's stochastic-rounding arguments ([note: stochastic rounding]): none, or a bfloat16
    parameter and momentum both rounded stochastically (`sr`)."""
    rnd = torch.zeros(8, dtype=torch.int64) if sr else None
    return dict(rnd=rnd, rnd_in=None if table or not sr else rnd[:4],
                MDTYPE=_tl_dtypes()[torch.bfloat16 if sr else torch.float32], SR=sr, SR_P=sr,
                SR_M=sr)


def launch_args(phase, dtype=torch.float32, aligned=True, sqrt=True, gscale=False, lr=None,
                table=True, sr=False):
    """The argument dict of one launch, as _ops.py builds it (CPU tensors stand in for device
    tensors: only their dtype and 16-byte alignment matter to the specialization)."""
    tk = _tk()
    ops = tk.launch
    t32 = lambda: torch.zeros(4, dtype=torch.float32)  # noqa: E731
    if table:
        operands = dict(meta=torch.zeros(64, dtype=torch.int64), n_tensors=300, p_in=None,
                        g_in=None, f_in=None, step_in=None, m_in=None, numel_in=0, slot_in=0)
    else:
        x = lambda dt: torch.zeros(64, dtype=dt)  # noqa: E731
        operands = dict(meta=None, n_tensors=0, p_in=x(dtype), g_in=x(dtype),
                        f_in=x(torch.float32), step_in=torch.zeros((), dtype=torch.float32),
                        m_in=x(torch.float32) if phase == "B" else None, numel_in=4097,
                        slot_in=3)
    common = dict(partials=torch.zeros(8, 2, dtype=torch.float64), skip=t32(),
                  gscale=t32() if gscale else None)
    consts = dict(DTYPE=_tl_dtypes()[dtype], HAS_GSCALE=gscale, SQRT=sqrt,
                  ALIGNED=aligned and table, TABLE=table, INTERPRET=False,
                  BLOCK=ops.block_for(0.5 if sqrt else 0.75))
    if phase == "A":
        scalars = dict(beta2=0.999, p=0.5, eps_p=1e-8, clip=1.0, sign=1.0,
                       chunk_size=_chunk(), fuse_one_chunk=True)
        return dict(**operands, **common, **scalars, **consts), tk._kernels._phase_a_kernel
    scalars = dict(lr=1e-3, beta1=0.9, omb1=0.1, beta2=0.999, eps_p=1e-8, p=0.5, clip=1.0, wd=1e-3,
                   sign=1.0, chunk_size=_chunk(), fuse_one_chunk=True)
    lr_ptr = None if lr is None else torch.zeros(1, dtype=lr)
    return (dict(**operands, **common, lr_ptr=lr_ptr, **scalars, **consts, HAS_LR=lr is not None,
                 SLOT_BLOCK=ops.SLOT_BLOCK, **rounding_args(sr, table)),
            tk._kernels._phase_b_kernel)


def _source(kernel, args):
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = getattr(kernel, "fn", kernel)  # the JITFunction behind an InterpretedFunction
    if not isinstance(fn, triton.runtime.JITFunction):
        fn = triton.runtime.JITFunction(fn)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, args[param.name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        if param.annotation_type:
            signature[name] = param.annotation_type
            continue
        specialize = not param.do_not_specialize
        ty, attr = native_specialize_impl(BaseBackend, value, False, specialize, specialize)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = value
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


def _triton_bin(name):
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


@functools.lru_cache(maxsize=None)
def compile_ptx(phase, arch, **spec):
    """PTX of one specialization for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    args, kernel = launch_args(phase, **spec)
    src = _source(kernel, args)
    tk = _tk()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tk.launch.NUM_WARPS})
    return compiled.asm["ptx"]


@functools.lru_cache(maxsize=None)
def ptxas_stats(phase, arch, **spec):
    """(registers, spill store bytes, spill load bytes, ptxas -v text) of one specialization."""
    return ptxas_report(compile_ptx(phase, arch, **spec))


def ptxas_report(ptx):
    """(registers, spill store bytes, spill load bytes, ptxas -v text) of one kernel's PTX."""
    # Triton targets sm_90a on Hopper (the arch-specific feature set); ptxas needs the same name.
    gpu = re.search(r"^\.target (sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(_triton_bin("ptxas")), "-v", f"--gpu-name={gpu}",
                              str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill.group(1)), int(spill.group(2)), text


def specializations(full=False):
    """(phase, spec) pairs the optimizer can launch. `full`: the whole product. Otherwise a
    covering set: every dtype x alignment of both kernels on the default hyperparameters (p = 0.5,
    no GradScaler, float lr, eager table path), plus the heaviest variant of each kernel (pow path,
    grad_scale, float64 lr tensor) per dtype width, plus the per-tensor (traced) path."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    out = []
    if full:
        for phase in "AB":
            lrs = (None,) if phase == "A" else (None, torch.float32, torch.float64)
            for dt, al, sq, gs, lr, tb in itertools.product(dtypes, (True, False), (True, False),
                                                            (False, True), lrs, (True, False)):
                if al and not tb:
                    continue  # the traced path leaves alignment to Triton's own specialization
                spec = dict(dtype=dt, aligned=al, sqrt=sq, gscale=gs, table=tb)
                if phase == "B":
                    spec["lr"] = lr
                out.append((phase, spec))
        out.append(("B", dict(dtype=torch.bfloat16, aligned=True, sr=True)))
        return out
    for phase in "AB":
        for dt, al in itertools.product(dtypes, (True, False)):
            out.append((phase, dict(dtype=dt, aligned=al)))
        heavy = dict(sqrt=False, gscale=True, **({"lr": torch.float64} if phase == "B" else {}))
        for dt in (torch.float32, torch.bfloat16):
            out.append((phase, dict(dtype=dt, aligned=True, **heavy)))
        out.append((phase, dict(dtype=torch.float32, aligned=False, table=False, **heavy)))
    out.append(("B", dict(dtype=torch.bfloat16, aligned=True, sr=True)))  # stochastic rounding
    return out


def launch_ptx(fn, args, arch):
    """PTX for sm_<arch> of kernel `fn` with a launch's argument dict `args` (num_warps, the
    launch option, among them), as the AdaFisher and FAdafactor scripts' launch_args give it."""
    import triton
    from triton.backends.compiler import GPUTarget

    args = dict(args)
    num_warps = args.pop("num_warps")
    compiled = triton.compile(_source(fn, args), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def report_rows(archs, specs, compile_ptx, describe, aligned):
    """[{arch, kernel, registers, spill_stores, spill_loads, dtype, aligned, v4_loads}]: every
    (kernel, spec) of `specs` on every arch compiled by compile_ptx(kernel, arch, **spec), with
    ptxas -v's figures; aligned(kernel, spec) says whether the specialization should load 128 bits
    at a time."""
    rows = []
    for arch in archs:
        for kernel, spec in specs:
            ptx = compile_ptx(kernel, arch, **spec)
            regs, st, ld, _ = ptxas_report(ptx)
            rows.append(dict(arch=arch, kernel=describe(kernel, spec), registers=regs,
                             spill_stores=st, spill_loads=ld,
                             dtype=str(spec.get("dtype", torch.float32)).replace("torch.", ""),
                             aligned=aligned(kernel, spec), v4_loads=has_v4_loads(ptx)))
    return rows


def aligned_table(_kernel, spec):
    """Whether a specialization asserts 16-byte alignment: aligned, on the table path (the
    traced path leaves alignment to Triton's own specialization)."""
    return spec.get("aligned", True) and spec.get("table", True)


def report_main(argv, report, trace=None):
    """The command line of the AdaFisher and FAdafactor scripts: `trace()` with --trace, else
    report(archs) (--arch=80 ..., default ARCHS) as JSON with --json or one line per row."""
    use_this_checkout()
    if trace is not None and "--trace" in argv:
        print(json.dumps(trace()))
        return
    archs = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--arch=")] or list(ARCHS)
    rows = report(archs)
    if "--json" in argv:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"sm_{r['arch']} {r['kernel']:45s} regs {r['registers']:3d} spill "
              f"{r['spill_stores']}/{r['spill_loads']} v4 {r['v4_loads']}")


def describe(kernel, spec, label=None):
    """One specialization in words: `label` (default phase_a / phase_b), the dtype, the alignment
    of the element kernels A and B, and its variants."""
    parts = [label or f"phase_{kernel.lower()}",
             str(spec.get("dtype", torch.float32)).replace("torch.", "")]
    if kernel in ("A", "B"):
        parts.append("aligned" if spec.get("aligned", True) and spec.get("table", True)
                     else "unaligned")
    if not spec.get("sqrt", True):
        parts.append("pow")
    if spec.get("gscale"):
        parts.append("grad_scale")
    if spec.get("lr") is not None:
        parts.append("lr_" + str(spec["lr"]).replace("torch.", ""))
    if not spec.get("table", True):
        parts.append("per-tensor")
    if spec.get("sr"):
        parts.append("stochastic-rounding")
    return " ".join(parts)


def has_v4_loads(ptx):
    """128-bit (or wider) global loads: ld.global.v4.b32 / .v4.f32, or .v2.b64."""
    return re.search(r"ld\.global(\.\w+)*\.(v4|v8)\.|ld\.global(\.\w+)*\.v2\.(b|f|u|s)64", ptx) is not None


# ---- torch.compile's trace ----------------------------------------------------------------------

def trace():
    """The Triton kernel calls in the AOTAutograd graph of one step over tensors of 2 chunks,
    1 fused chunk and none: [{grid, table, numel}]."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    tk, chunk = _tk(), _chunk()
    shapes = [(chunk + 4464,), (10,), (0,)]

    def step(params, grads, fims, moms, steps, partials, skip, lr_tensor):
        tk.phase_a(params, grads, fims, steps, partials, skip, None, beta2=0.999, eps=1e-8,
                   p=0.5, clip=1.0, maximize=False, chunk_size=chunk, fuse_one_chunk=True)
        tk.phase_b(params, grads, fims, moms, steps, partials, skip, None, lr_tensor, lr=0.0,
                   beta1=0.9, beta2=0.999, eps=1e-8, p=0.5, clip=1.0, weight_decay=1e-3,
                   maximize=False, chunk_size=chunk, fuse_one_chunk=True)

    graphs = []

    def fw_compiler(gm, _inputs):
        graphs.append(gm)
        return gm

    with FakeTensorMode():
        mk = lambda: [torch.zeros(s, device="cuda") for s in shapes]  # noqa: E731
        params, grads, fims, moms = mk(), mk(), mk(), mk()
        steps = [torch.ones((), device="cuda") for _ in shapes]
        partials = torch.zeros(4, 2, dtype=torch.float64, device="cuda")
        skip = torch.zeros(1, device="cuda")
        lr = torch.full((), 1e-3, device="cuda")
        aot_function(step, fw_compiler=fw_compiler)(params, grads, fims, moms, steps, partials,
                                                    skip, lr)
    nodes = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    return [{"grid": [list(g) for g in n.kwargs["grid"]],
             "table": n.kwargs["kwargs"].get("TABLE"),
             "numel": n.kwargs["kwargs"].get("numel_in")} for n in nodes]


# ---- run from the tests ----------------------------------------------------------------------


def _script(script, *args):
    """The command and environment of tests/<script> with `args`, without TRITON_INTERPRET
    (compilation and wrap_triton need the JITFunctions, which the interpreted kernels of the test
    process are not)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return [sys.executable, str(Path(__file__).with_name(script)), *args], env


def _last_json(code, stdout, stderr):
    assert code == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


class ScriptJobs:
    """A test module's runs of a script in the background (tests/conftest.py's BackgroundJob):
    the sm_80 and sm_90 compile reports of `compile_args`, and the torch.compile trace."""

    def __init__(self, script, compile_args):
        self.script, self.compile_args, self.jobs = script, compile_args, {}

    def start(self):
        from conftest import BackgroundJob

        if not self.jobs:
            runs = {arch: ("--json", *self.compile_args, f"--arch={arch}") for arch in ARCHS}
            for name, args in {**runs, "trace": ("--trace",)}.items():
                argv, env = _script(self.script, *args)
                self.jobs[name] = BackgroundJob(argv, env=env)

    def stop(self):
        for job in self.jobs.values():
            job.stop()
        self.jobs.clear()

    def result(self, name):
        """The JSON of job `name` (an arch, or "trace"), once it is done."""
        self.start()
        return _last_json(*self.jobs[name].wait())

    def compile_reports(self):
        return [self.result(arch) for arch in ARCHS]


def assert_compiles_without_spills(reports, count, max_registers, wants_v4_loads):
    """Every specialization of each arch's report (ScriptJobs.compile_reports) compiled: `count`
    of them per arch, no spill stores or loads, at most `max_registers` registers, and 128-bit
    loads in the rows where wants_v4_loads(row)."""
    for report in reports:
        assert len(report) == count, f"{len(report)} specializations compiled, expected {count}"
        for row in report:
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
            assert row["registers"] <= max_registers, row
            if wants_v4_loads(row):
                assert row["v4_loads"], f"no 128-bit loads in the aligned float32 path: {row}"


def use_this_checkout():
    """Import fadam_fused (and its triton_kernels) from the checkout this file is in. An editable
    install's finder maps fadam_fused.triton_kernels to the checkout it was installed from, which
    need not be this one (a git worktree): compile this one's kernels."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in repr(f)
                        and "__editable__" not in getattr(f, "__module__", "")]


def _main(argv):
    use_this_checkout()
    if "--trace" in argv:
        print(json.dumps(trace()))
        return
    full = "--all" in argv or os.environ.get("FADAM_TRITON_COMPILE_ALL") == "1"
    archs = [int(a.split("=", 1)[1]) for a in argv if a.startswith("--arch=")] or list(ARCHS)
    specs = specializations(full)
    if "--json" in argv:
        rows = report_rows(archs, specs, compile_ptx, describe, aligned_table)
        print(json.dumps(rows))
        return
    print("| kernel / specialization | " + " | ".join(f"sm_{a} regs | sm_{a} spill st/ld (B)"
                                                    for a in archs) + " | 128-bit loads |")
    print("|---|" + "---|---|" * len(archs) + "---|")
    for phase, spec in specs:
        cells = []
        for arch in archs:
            regs, st, ld, _ = ptxas_stats(phase, arch, **spec)
            cells += [str(regs), f"{st}/{ld}"]
        v4 = has_v4_loads(compile_ptx(phase, archs[-1], **spec))
        print(f"| {describe(phase, spec)} | " + " | ".join(cells) + f" | {'yes' if v4 else 'no'} |")


if __name__ == "__main__":
    _main(sys.argv[1:])
