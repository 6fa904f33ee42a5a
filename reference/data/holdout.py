"""The held-out split of `trinity data prepare --holdout FRACTION|N_DOCS` (SPEC §10): which documents are held out.

A document's side is decided by its content alone: the SHA-256 of the file's raw bytes, read as a big-endian integer
h in [0, 2**256) (so h / 2**256 is a uniform number in [0, 1)). A document is held out when h < `bound`, where
  - FRACTION f (0 < f < 1): bound = ceil(f · 2**256), i.e. held out when h / 2**256 < f;
  - N_DOCS n (an integer >= 1): bound = (the n-th smallest h among the usable documents) + 1: the n documents with
    the smallest hashes, plus any exact duplicates of them (same bytes, same hash, same side).
So the split does not depend on the order of the inputs, the number of workers or the tokenizer, and two files with
the same bytes always land on the same side: a duplicate never leaks across the split. The n-th smallest hash is
found in one pass that keeps only n hashes (`count_rule`).

`parse_holdout` reads the option: a string containing "." or "e" is a fraction, any other an integer count (so
"1e3" is the fraction 1000, refused); a Python float is a fraction, an int a count.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from fractions import Fraction

from .store import DataError

__all__ = ["HOLDOUT_RULE", "HoldoutError", "HoldoutSpec", "HoldoutRule", "parse_holdout", "content_digest",
           "fraction_rule", "count_rule"]

HOLDOUT_RULE = "sha256-of-content"
_SPACE = 1 << 256


class HoldoutError(DataError):
    """A --holdout value, or a corpus, that gives no usable split; the message names the option."""


@dataclass(frozen=True)
class HoldoutSpec:
    """What was asked: a fraction in (0, 1), or a number of documents >= 1 (exactly one is set)."""

    fraction: float | None = None
    documents: int | None = None

    def record(self) -> dict:
        """The part of meta.json's "holdout" record that says what was asked."""
        return {"fraction": self.fraction} if self.fraction is not None else {"asked_documents": self.documents}

    def describe(self) -> str:
        return f"fraction {self.fraction:g}" if self.fraction is not None else f"{self.documents:,} document(s)"


def parse_holdout(value) -> HoldoutSpec:
    """A HoldoutSpec from a CLI string ("0.05", "1e-2", "500") or a Python float/int; HoldoutError in one line."""
    if isinstance(value, HoldoutSpec):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise HoldoutError(f"--holdout must be a fraction (0 < f < 1) or a number of documents (>= 1), got "
                           f"{value!r}")
    text = value.strip() if isinstance(value, str) else None
    if text is not None:
        is_fraction = "." in text or "e" in text.lower()
        try:
            number = float(text) if is_fraction else int(text)
        except ValueError:
            raise HoldoutError(f"--holdout {value!r} is not a number: give a fraction (e.g. 0.05) or a number of "
                               f"documents (e.g. 500)") from None
    else:
        number = value
    if isinstance(number, float):
        if not (math.isfinite(number) and 0 < number < 1):
            raise HoldoutError(f"--holdout {value!r}: a fraction must lie strictly between 0 and 1 (a number of "
                               f"documents is written without '.' or 'e')")
        return HoldoutSpec(fraction=float(number))
    if number < 1:
        raise HoldoutError(f"--holdout {value!r}: a number of documents must be >= 1 (or give a fraction "
                           f"0 < f < 1)")
    return HoldoutSpec(documents=int(number))


def content_digest(data: bytes) -> bytes:
    """SHA-256 of a document's raw bytes (what decides its side)."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class HoldoutRule:
    """A document is held out when int(sha256 of its bytes) < bound (module docstring)."""

    bound: int

    def holds(self, digest: bytes) -> bool:
        return int.from_bytes(digest, "big") < self.bound


def fraction_rule(fraction: float) -> HoldoutRule:
    """Held out when h / 2**256 < fraction, exactly (h an integer: h < f·2**256 ⇔ h < ceil(f·2**256))."""
    return HoldoutRule(math.ceil(Fraction(fraction) * _SPACE))


def count_rule(digests, documents: int) -> tuple[HoldoutRule, int]:
    """(the rule holding out the `documents` smallest of `digests` and their duplicates, how many digests there
    were). `digests`: an iterable of the usable documents' digests, read once, keeping `documents` of them."""
    count = 0

    def counted():
        nonlocal count
        for d in digests:
            count += 1
            yield int.from_bytes(d, "big")

    smallest = heapq.nsmallest(documents, counted())
    if len(smallest) < documents:
        return HoldoutRule(_SPACE), count
    return HoldoutRule(smallest[-1] + 1), count
