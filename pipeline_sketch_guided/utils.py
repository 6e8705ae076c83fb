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
