"""fadam_fused: fused CUDA, Triton and CPU kernels for the Fisher-preconditioned optimizers:
FAdam (Hwang 2024), FAdafactor, its factored variant (the paper's Algorithm 2), and AdaFisher
(Gomes et al., ICLR 2025).

    from fadam_fused import FAdam
    opt = FAdam(model.parameters(), lr=1e-3)   # drop-in for torch.optim.AdamW

docs/design.md has the algorithm and the contract; README.md, building and benchmarking.
"""

from . import reference
from .adafisher import AdaFisher, AdaFisherW
from .backends import BACKENDS
from .fadafactor import FAdafactor
from .fadam import FAdam, fadam
from .optimizer import FisherOptimizer

__all__ = ["FAdam", "FAdafactor", "AdaFisher", "AdaFisherW", "FisherOptimizer", "fadam",
           "reference", "BACKENDS"]
__version__ = "0.1.0"
