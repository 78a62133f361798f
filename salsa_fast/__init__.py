"""salsa_fast: SaLSA, the learning-rate-free line-search optimizer, fast.

from salsa_fast import SaLSA
optimizer = SaLSA(model.parameters())
"""

from .labpal import LABPAL
from .salsa import SaLSA, SaLSAWarning, StepInfo
from .sls import SLS

__all__ = ["SaLSA", "SLS", "LABPAL", "SaLSAWarning", "StepInfo"]
__version__ = "0.1.0"
