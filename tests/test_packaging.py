"""The package without its compiled extension: it imports, says once why, and falls back."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_missing_extension_falls_back_to_reference_and_says_why():
    # sys.modules[name] = None makes `import fadam_fused._C` raise ImportError, as a failed build
    # would, without touching the built library.
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["fadam_fused._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from fadam_fused import FAdam, backends
        messages = [str(w.message) for w in caught if "fadam_fused._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation -e ." in messages[0], messages[0]
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.ones(4)
        FAdam([p]).step()                       # auto: the reference backend
        assert backends.resolve(None, p.device) == "reference"
        assert float(p[0]) < 1.0
        try:
            FAdam([p], backend="cpu").step()
        except RuntimeError as exc:
            assert "could not be imported" in str(exc) and "pip install" in str(exc), exc
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
