import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Keep CPU runs reproducible and quick on small CI machines.
torch.set_num_threads(min(2, torch.get_num_threads()))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
