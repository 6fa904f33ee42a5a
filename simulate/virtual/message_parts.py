"""What each receiver reads of a virtual collective's contribution, and how a corrupt-message fault changes it
(simulate/virtual/virtual_comm.py's faulty link; trinity.simulate.virtual.faults). Kept apart so the communicator reads top to bottom."""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["whole", "block", "corruptible", "flip_bits"]


def whole(contribution: np.ndarray, receiver: int) -> np.ndarray:
    """What a rank reads of an Allreduce / Allgather contribution: all of it."""
    return contribution


def block(n: int) -> Callable:
    """What rank r reads of an Alltoall / Reduce_scatter_block contribution: block r of n equal blocks."""
    def reads(contribution: np.ndarray, receiver: int) -> np.ndarray:
        b = contribution.size // n
        return contribution[receiver * b:(receiver + 1) * b]
    return reads


def corruptible(part: np.ndarray) -> bool:
    """Whether a corruption can go into this part of a message: floats (the values a rank trains on) or bytes
    (checksummed messages travel as bytes), and not empty. Integer messages (counts, indices) are left alone: a bit
    flipped there would crash the receiver rather than change what it trains on."""
    return part.size > 0 and (part.dtype.kind == "f" or part.dtype == np.uint8)


def flip_bits(part: np.ndarray) -> None:
    """Flip, in place, bit 3 of the second most significant byte of every element of part (little-endian; a byte's
    bit 3 for bytes): a high mantissa bit of a float64 or float32, so every value changes (by up to half; a zero
    stays next to zero) but stays finite. Every element, so whatever part of the message the receiver uses (a
    gathered embedding is read only at its batch's tokens) is wrong: a fixed stand-in for a bad link."""
    raw = part.view(np.uint8).reshape(part.size, part.itemsize)
    raw[:, max(part.itemsize - 2, 0)] ^= 0x08
