import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It is chosen when
# the kernels are defined, so this must precede any import of salsa_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU runs reproducible and quick on small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The kernel tests' device, dtypes and per-dtype tolerances (a few units in the last place of the
# parameter dtype; fp32 state near 0 after cancellation gets absolute ulps), and their shapes:
# 2666 elements, three blocks and a masked tail.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {
    torch.float64: dict(rtol=1e-13, atol=1e-15),
    torch.float32: dict(rtol=4e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-9, atol=1e-5),
}
STATE_TOL = {torch.float64: dict(rtol=1e-13, atol=1e-15)}
STATE_TOL_32 = dict(rtol=2e-6, atol=1e-7)
SHAPES = [(37, 29), (1,), (), (1500,), (3, 5, 7)]
