"""salsa_fast: SaLSA, the learning-rate-free line-search optimizer, fast.

    from salsa_fast import SaLSA
    optimizer = SaLSA(model.parameters())
"""

from .optimizer import SLS, SaLSA, SaLSAWarning, StepInfo

__all__ = ["SaLSA", "SLS", "SaLSAWarning", "StepInfo"]
__version__ = "0.1.0"
