"""Plumbing: what the method files stand on but a reader of the method can skip.

    weights.py            strict reading and atomic writing of weight files (safetensors, weights-only pickles)
    single_file.py        original single-file SD checkpoints (LDM key names) -> our module names
    diffusers_configs.py  diffusers config.json -> the UNet's and the VAE's configs, refusing what SD does not use
    checkpoints.py        FlowSR checkpoint files: the full kind (tiny preset) and the published LoRA layout
    flags.py              a dataclass config as the command line: every field a --flag, unknown flags are errors
    paths.py              file names as the file system compares them (case ignored on Windows and macOS)
    trainstate.py         the resumable training state train.py writes and --resume reads, and its checkpoints
    training.py           train.py's loop machinery: signals, data parallelism, data order, log windows
    validation.py         train.py's validation grids
    dists.py              the DISTS metric of evaluate.py (a VGG-16 backbone with learned weights)
    vgg16.py              the VGG-16 trunk that LPIPS (losses.py) and DISTS share
"""
