"""Message checksums for the cluster mode (`[parallel] checksums = true`, or `--checksums`): every block of data a
rank receives from another rank carries the sender's crc32 of it, and the receiver checks it before using the data.

A bit flipped on the way (a faulty link or NIC; `trinity simulate --fault corrupt:…` injects one) then stops the run
with ChecksumError naming the sending rank, the receiving rank, the collective, its mesh group, the step and the
phase, instead of silently training on wrong numbers.

How: `Checked(comm, describe)` has the data-moving methods the mesh uses, `Allgather`, `Iallgather`, `Alltoall` and
`Alltoallv`, over any communicator. Each sends its blocks as bytes, each block followed by its crc32 (4 bytes),
in one call of the same collective on byte buffers, and checks every block that came from another rank (a rank's
own block never leaves it). Reductions have no such form (a reduced block is no one rank's message), so with
checksums the mesh builds every sum and maximum, at any group size, from an Alltoall and an Allgather with the
terms combined in rank order (mesh._ordered_reduce): the results are the same bits as without checksums, because
the mesh already sums over more than two ranks that way and a sum or maximum of two terms has one result in either
order.

Cost: 4 bytes per block per receiver (`crc_bytes`, counted in the mesh's traffic), a copy of each message into and
out of the byte buffer, and a crc32 over every byte sent and received (zlib: GB/s).
"""

from __future__ import annotations

import zlib
from typing import Callable

import numpy as np

__all__ = ["ChecksumError", "Checked", "crc_bytes", "CRC_BYTES"]

CRC_BYTES = 4


class ChecksumError(RuntimeError):
    """A block received whose crc32 differs from the one its sender computed (the message names both ranks, the
    collective, the group, the step and the phase)."""


def crc_bytes(kind: str, n: int, me: int, args) -> int:
    """The checksum bytes this rank sends for one mesh collective `kind` over n ranks (this one group rank `me`):
    one crc per block that goes to another rank. Allreduce moves an Alltoall and an Allgather."""
    if kind == "Alltoallv":
        counts = np.asarray(args[0][1][0]).reshape(-1)
        return CRC_BYTES * int(sum(1 for j, c in enumerate(counts) if c and j != me))
    return CRC_BYTES * (n - 1) * (2 if kind == "Allreduce" else 1)


def _raw(array) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (writing it writes the array)."""
    a = np.asarray(array)
    if not a.flags.c_contiguous:
        raise ValueError(f"a checked message needs a contiguous buffer (shape {a.shape}, strides {a.strides})")
    return a.reshape(-1).view(np.uint8)


def _sealed(blocks: list) -> np.ndarray:
    """The byte blocks end to end, each followed by its crc32 (little-endian)."""
    out = np.empty(sum(b.size + CRC_BYTES for b in blocks), dtype=np.uint8)
    at = 0
    for b in blocks:
        out[at:at + b.size] = b
        out[at + b.size:at + b.size + CRC_BYTES] = np.frombuffer(zlib.crc32(b).to_bytes(4, "little"), np.uint8)
        at += b.size + CRC_BYTES
    return out


def _starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


class Checked:
    """The data-moving collectives of `comm` with a crc32 per block, checked on receipt. `describe(sender, inner)`
    is the message of the ChecksumError raised when the block from group rank `sender` does not match its crc
    (`inner`: the collective that moved it)."""

    def __init__(self, comm, describe: Callable[[int, str], str]):
        self.comm, self.describe = comm, describe
        self.n, self.me = comm.Get_size(), comm.Get_rank()

    def Get_size(self) -> int:
        return self.n

    def _open(self, block: np.ndarray, sender: int, inner: str) -> np.ndarray:
        """The data of a sealed block from `sender`, once its crc32 matches (a rank's own block is not checked: it
        never left the rank)."""
        data = block[:-CRC_BYTES]
        if sender != self.me and zlib.crc32(data) != int.from_bytes(block[-CRC_BYTES:].tobytes(), "little"):
            raise ChecksumError(self.describe(sender, inner))
        return data

    def _unpack_rows(self, rows: np.ndarray, out: np.ndarray, inner: str) -> None:
        """Row j of `rows` (block j, sealed) into block j of the bytes `out`."""
        m = rows.shape[1] - CRC_BYTES
        for j in range(self.n):
            out[j * m:(j + 1) * m] = self._open(rows[j], j, inner)

    def Allgather(self, send, recv) -> None:
        self._gather(send, recv, blocking=True)

    def Iallgather(self, send, recv):
        """Every rank's block, sealed, gathered; opened into `recv` at Wait()."""
        return self._gather(send, recv, blocking=False)

    def _gather(self, send, recv, blocking: bool):
        sealed = _sealed([_raw(send)])
        rows = np.empty((self.n, sealed.size), dtype=np.uint8)
        out = _raw(recv)
        if blocking:
            self.comm.Allgather(sealed, rows)
            return self._unpack_rows(rows, out, "Allgather")
        request = self.comm.Iallgather(sealed, rows)
        return _OpenOnWait(request, lambda: self._unpack_rows(rows, out, "Iallgather"), keep=sealed)

    def Alltoall(self, send, recv) -> None:
        sealed = _sealed(list(_raw(send).reshape(self.n, -1)))
        rows = np.empty((self.n, sealed.size // self.n), dtype=np.uint8)
        self.comm.Alltoall(sealed, rows)
        self._unpack_rows(rows, _raw(recv), "Alltoall")

    def Alltoallv(self, send_spec, recv_spec) -> None:
        """[array, (counts, displs)] specs, in elements, as the mesh's callers pass them; a block of no elements
        travels without a crc (nothing is sent where nothing was)."""
        (send, (sc, sd)), (recv, (rc, rd)) = send_spec, recv_spec
        item = np.asarray(send).dtype.itemsize
        sc, sd, rc, rd = (np.asarray(x, dtype=np.int64).reshape(-1) * item for x in (sc, sd, rc, rd))
        raw_send, out = _raw(send), _raw(recv)
        sealed = _sealed([raw_send[d:d + c] for c, d in zip(sc, sd) if c])
        scounts, rcounts = np.where(sc > 0, sc + CRC_BYTES, 0), np.where(rc > 0, rc + CRC_BYTES, 0)
        got = np.empty(int(rcounts.sum()), dtype=np.uint8)
        self.comm.Alltoallv([sealed, (scounts, _starts(scounts))], [got, (rcounts, _starts(rcounts))])
        for j, at in enumerate(_starts(rcounts)):
            if rc[j]:
                out[rd[j]:rd[j] + rc[j]] = self._open(got[at:at + rcounts[j]], j, "Alltoallv")


class _OpenOnWait:
    """The request of a checked Iallgather: Wait() completes the transfer, then checks and unpacks what arrived."""

    def __init__(self, request, finish: Callable, keep):
        self._request, self._finish, self._keep = request, finish, keep  # keep: the send buffer, alive until Wait
        self._done = False

    def Wait(self, status=None) -> None:
        if not self._done:
            self._request.Wait()
            self._done = True
            self._finish()

    def Test(self, status=None) -> bool:
        if not self._done and not self._request.Test():
            return False
        self.Wait()
        return True
