"""Devices and threads: which device a script runs on, how many torch threads it uses, and whether the
training images can live on the device. Shared by train.py, validation.py, predict.py and bench.py."""
import torch

from utils import UserError, available_cpus

DEVICES = ("auto", "cpu", "cuda")
DATA_PATHS = ("auto", "host", "device")
# --data_path auto keeps the decoded training images on a CUDA device when they take at most this share
# of the memory the device has free when the run starts: the rest is for the model, its activations
# (about 1.3 GB at batch 64 and 3.7 GB at batch 256, 224 px, bf16, on one H200) and a second run on
# the same card (reproduce.py --jobs_per_gpu)
DEVICE_CACHE_SHARE = 0.25


def resolve_device(name):
    """'auto' -> cuda where available, else cpu; 'cuda' without a CUDA device is a UserError."""
    if name not in DEVICES:
        raise UserError(f"--device {name!r} is not valid; choose one of: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        "cpu" if name == "auto" else name)


def check_threads(threads):
    if threads is not None and not 1 <= threads <= available_cpus():
        raise UserError(f"--threads must be between 1 and the {available_cpus()} CPU(s) this process may use, "
                        f"got {threads}")


def use_threads(n):
    """torch's intra-op threads (and its inter-op threads, where this process has not used them yet)
    set to n, before the run's first operation; None leaves torch's default. -> the count in force."""
    if n is not None:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:
            pass   # only settable once per process, before any inter-op work; intra-op is what training uses
    return torch.get_num_threads()


def data_path(requested, device, cache_bytes, cached):
    """--data_path -> 'host' (the training images stay in host memory and are augmented in DataLoader
    workers) or 'device' (they are copied to the device once and augmented there, batch by batch).
    auto: device on CUDA when the images are cached (--cache) and take at most DEVICE_CACHE_SHARE of the
    device's free memory, host otherwise. device is refused without --cache; on a CPU it runs the
    device path's code on CPU tensors (what the tests compare with the host path)."""
    if requested not in DATA_PATHS:
        raise UserError(f"--data_path {requested!r} is not valid; choose one of: {', '.join(DATA_PATHS)}")
    if requested == "device" and not cached:
        raise UserError("--data_path device needs --cache: the decoded images are what moves to the device; "
                        "drop --no-cache or use --data_path host")
    if requested != "auto":
        return requested
    if device.type != "cuda" or not cached:
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if cache_bytes <= DEVICE_CACHE_SHARE * free else "host"
