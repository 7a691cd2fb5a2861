"""Argument checks shared by the public API: one sentence naming the argument, never a torch error later; and
`warn_at_caller`, the package's warnings pointed at the user's line."""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def is_int(value) -> bool:
    """True for an integer (Python's or numpy's), False for bool, float and anything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a real number (int, float, numpy's), False for bool and anything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn pointed at the first frame outside streaming_llm, transformers, torch and accelerate (whose
    hooks wrap an offloaded model's forward): the line of the user's code that led to it, however deep in those
    packages the warning is found (a fixed stacklevel named a line inside one of them)."""
    import torch
    import transformers

    import streaming_llm

    modules = (streaming_llm, transformers, torch, sys.modules.get("accelerate"))  # accelerate: only where loaded
    packages = tuple(str(Path(module.__file__).parent) + os.sep for module in modules if module is not None)
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn_at_caller's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(packages):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_int(name: str, value, minimum: int, note: str = "") -> int:
    """`value` as a Python int; ValueError unless it is an integer >= minimum (`note` is added to the message)."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{note}, got {value!r}")
    return int(value)


def is_integer_tensor(tensor: torch.Tensor) -> bool:
    """True for a tensor of an integer dtype (bool, float and complex are not token ids)."""
    import torch  # here, not above: SamplingConfig's checks are made before the command line loads torch

    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def check_token_ids(name: str, ids, min_length: int = 1) -> None:
    """ValueError unless `ids` is an integer tensor of token ids of shape [1, n], n >= min_length (an empty input
    is refused here, not by a torch error inside the model)."""
    import torch

    if torch.is_tensor(ids):
        if is_integer_tensor(ids) and ids.dim() == 2 and ids.shape[0] == 1 and ids.shape[1] >= min_length:
            return
        got = f"shape {tuple(ids.shape)}, {ids.dtype}"
    else:
        got = type(ids).__name__
    raise ValueError(f"{name} must be an integer tensor of token ids of shape [1, n], n >= {min_length}; got {got}")
