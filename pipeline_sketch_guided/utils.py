"""Small helpers shared by the package, the training scripts and the benchmarks."""

import diffusers
import torch
from packaging.version import Version

# diffusers 0.40 renamed the `torch_dtype` of `from_pretrained` to `dtype` and warns on the old name; older releases
# know only `torch_dtype`.
_DTYPE_KEYWORD = "dtype" if Version(Version(diffusers.__version__).base_version) >= Version("0.40") else "torch_dtype"


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """`{"dtype": dtype}` for diffusers' `from_pretrained`, under the keyword that the installed diffusers takes."""
    return {_DTYPE_KEYWORD: dtype}


def device_name(device: torch.device | str) -> str:
    """What a training record or benchmark says it ran on: the GPU's name, or the CPU with torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type.upper()} ({torch.get_num_threads()} torch threads)"
