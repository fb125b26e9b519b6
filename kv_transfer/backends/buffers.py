"""Reusable staging buffers for the backends' data paths.

    PingPong:  staging(n) -> buffer A (after A's previous sends completed) -> fill
               -> send(A) posts async sends, returns at once -> staging(n) -> buffer B ...

so the sender gathers and checksums layer i+1 while layer i is still on the wire.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GrowBuffer:
    """A reusable uint8 buffer that grows to the largest size asked for."""

    def __init__(self, device: str = "cpu") -> None:
        self._device = device
        self._buf = torch.empty(0, dtype=torch.uint8, device=device)

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        return self._buf[:nbytes]


class PingPong:
    """Two staging buffers; each is reused only after its outstanding sends finished."""

    def __init__(self, device: str = "cpu") -> None:
        self._bufs = (GrowBuffer(device), GrowBuffer(device))
        self._waits: list[list[Callable[[], None]]] = [[], []]
        self._turn = 0

    def staging(self, nbytes: int) -> torch.Tensor:
        """The next buffer, once every send still reading it has completed."""
        self._turn ^= 1
        self._drain(self._turn)
        return self._bufs[self._turn].get(nbytes)

    def sent(self, waits: list[Callable[[], None]]) -> None:
        """Register the completion waits of the sends reading the current buffer."""
        self._waits[self._turn] = waits

    def drain(self) -> None:
        """Wait for every outstanding send."""
        self._drain(0)
        self._drain(1)

    def _drain(self, turn: int) -> None:
        waits, self._waits[turn] = self._waits[turn], []
        for wait in waits:
            wait()
