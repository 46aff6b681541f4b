"""bench/grid_probe.py: the number that says whether what a model adds repeats with the 4x4 blocks."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import grid_probe  # noqa: E402
from grid_probe import block_harmonic_ratio  # noqa: E402
from report import run_main  # noqa: E402


def test_block_harmonic_ratio_finds_a_4px_pattern_and_only_that():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(96, 120, generator=generator)
    tile = torch.randn(4, 4, generator=generator)
    grid = tile.repeat(24, 30)  # (96, 120): the same 4x4 block everywhere
    stripes5 = torch.randn(5, 5, generator=generator).repeat(20, 24)[:96, :120]  # periodic, but not with 4 px
    assert 0.7 < block_harmonic_ratio(noise) < 1.3  # white noise: flat spectrum
    assert block_harmonic_ratio(noise + 0.3 * grid) > 20  # a faint block-locked grid stands out
    assert block_harmonic_ratio(noise + 0.3 * stripes5) < 1.5
    assert block_harmonic_ratio(noise + 0.3 * stripes5, period=5) > 20
    # smooth content (a ramp) carries no power at the harmonics either
    ramp = torch.linspace(0, 1, 120).expand(96, 120)
    assert block_harmonic_ratio(noise + ramp) < 1.5



def test_a_missing_checkpoint_or_folder_is_one_line(tmp_path):
    """Through report.run_main, as every probe runs: a WeightsError or ValueError ends the script in one line."""
    for argv, message in (([str(tmp_path / "none.safetensors")], f"{tmp_path / 'none.safetensors'}: no such file"),
                          (["--heldout", str(tmp_path / "none")], f"{tmp_path / 'none'}: no such folder")):
        with pytest.raises(SystemExit) as stop:
            run_main(lambda: grid_probe.main(argv))
        assert stop.value.code == f"error: {message}"
