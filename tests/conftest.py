import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PHOTOS = os.path.join(ROOT, "photos")

torch.set_num_threads(1)  # tiny test models: threads only add overhead


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
