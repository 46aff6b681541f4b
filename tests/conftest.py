import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PHOTOS = os.path.join(ROOT, "photos")

# The test models and images are tiny: a second intra-op thread only spin-waits on a busy shared CPU (up to 50x
# slower). Set here for module- and session-scoped fixtures too (a reference training run must see the same
# thread count as the runs compared with it), and again per test below.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread in every test, also after a test that asked for more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def projected(features):
    """transformers' CLIPModel.get_*_features: the projected tensor before transformers 5, an output whose
    pooler_output holds it from 5 on."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class TinyVelocityNet(nn.Module):
    """A two-layer velocity network v(z, t) for the 48-channel pixel latent: small enough to train in a test."""

    def __init__(self, channels=48, hidden=32):
        super().__init__()
        self.conv_in = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, z, timesteps, context):
        t_map = (timesteps / 1000).view(-1, 1, 1, 1).expand(-1, 1, *z.shape[2:])  # (B, 1, h, w)
        return self.conv_out(F.silu(self.conv_in(torch.cat([z, t_map], 1))))
