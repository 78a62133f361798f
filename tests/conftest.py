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
