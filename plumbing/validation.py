"""The validation grids of train.py: the same held-out crops every time, and what the model makes of them."""
import os
import re

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from data import DEGRADATIONS, ImageError, from_model, list_images, load_image, save_image, to_model
from flow import sample


def validation_batch(folder, crop_size, degradation, say, n=4):
    """(x_hr, x_lr) of the first n photos in folder: centre crops (a smaller photo is scaled up to the crop
    size), degraded like the training inputs (`degradation`: a name in data.DEGRADATIONS) with fixed seeds; None
    when there is no readable photo, or no folder (''; train.py has checked that a folder given is one)."""
    if not folder:
        say("no validation grids (--val-data '')")
        return None
    paths = list_images(folder)[:n]
    x_hrs, x_lrs = [], []
    for i, path in enumerate(paths):
        try:
            image = load_image(path)[0]  # (3, H, W) in [0, 1]
        except ImageError as e:
            say(f"warning: skipping {e}")
            continue
        size = min(crop_size, *image.shape[1:])
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        x_hr = image[:, top:top + size, left:left + size]  # (3, size, size)
        if size < crop_size:
            x_hr = F.interpolate(x_hr[None], size=crop_size, mode="bicubic")[0].clamp(0, 1)  # (3, S, S)
        x_hrs.append(to_model(x_hr))
        x_lrs.append(to_model(DEGRADATIONS[degradation](x_hr, 4, torch.Generator().manual_seed(1000 + i))))
    if not x_hrs:
        say(f"no validation grids: no readable photos in {folder}")
        return None
    return torch.stack(x_hrs), torch.stack(x_lrs)  # (B, 3, S, S), (B, 3, S/4, S/4)


@torch.no_grad()
def save_validation_grid(model, val, out_dir, stage, step, say):
    """OUT_DIR/val/stage{stage}_{step}.png: rows of up(x_LR) | one-step output | x_HR, made in eval mode (the model
    is left in train mode). A grid that cannot be written is a warning: it is a diagnostic, and training goes on
    to its next checkpoint."""
    model.eval()
    x_hr, x_lr = (x.to(model.context.device) for x in val)
    up = model.upsample_lr(x_lr)
    sr = model.decode(sample(model, model.encode(up), None, torch.tensor([1.0, 0.0]))).clamp(-1, 1)
    rows = torch.stack([up, sr, x_hr], dim=1).flatten(0, 1)  # (3B, 3, H, W)
    try:
        save_image(make_grid(from_model(rows), nrow=3, padding=2), os.path.join(out_dir, "val", grid_name(stage, step)))
    except OSError as e:
        say(f"warning: no validation grid: {e}")
    model.train()


def grid_name(stage, step):
    return f"stage{stage}_{step:06d}.png"


def grids_after(out_dir, stage, step):
    """Paths of the grids in OUT_DIR/val of steps after (stage, step); other files there are not ours."""
    folder = os.path.join(out_dir, "val")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found = [(name, re.fullmatch(r"stage([12])_(\d{6,})\.png", name)) for name in names]  # as grid_name writes
    return [os.path.join(folder, name) for name, match in found
            if match and (int(match[1]), int(match[2])) > (stage, step)]
