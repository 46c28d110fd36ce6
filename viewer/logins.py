"""Login attempts in flight, counted per account and per source address (no HTTP here).

The slow-down of failed logins (accounts.failure_delay: 0.25 s doubling up to 8 s) only
holds if attempts are checked one after another: sent in parallel, they would all read the
same failure count and all wait the same short time. So an attempt waits its turn behind
every attempt for the same account and every attempt from the same address, and only then
waits the delay their failures earned and checks the password. At most `waiting` attempts
per account (or per address) wait their turn; one more at that moment is answered at once
without its password being checked (`Busy`), so that a flood neither guesses faster nor
holds connections for minutes.

An address is counted by `source_of` (IPv6: its /64), here and in the failure counts.
Counted in this process: a viewer behind a load balancer counts per viewer process.
"""
from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


def source_of(address: str) -> str:
    """What a client's failed logins and open streams count against: its IPv4 address, or its
    IPv6 /64 (one host usually holds a whole /64, so single IPv6 addresses would be free for the
    asking). The DICOM side's rule (scp.tls.source_of), kept here: the viewer does not import scp."""
    host = str(address).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Busy(Exception):
    """Too many attempts for this account (or from this address) are already in flight."""

    def __init__(self, key: str):
        super().__init__(key)
        self.account = key.startswith("user:")


class _Turns:
    __slots__ = ("lock", "in_flight")

    def __init__(self):
        self.lock = asyncio.Lock()
        self.in_flight = 0


class LoginGate:
    def __init__(self, waiting: int):
        self.waiting = waiting
        self._keys: dict[str, _Turns] = {}

    def in_flight(self, key: str) -> int:
        turns = self._keys.get(key)
        return turns.in_flight if turns else 0

    @asynccontextmanager
    async def turn(self, name: str, address: str) -> AsyncIterator[None]:
        """Wait until no other attempt for `name` or from `address` is being checked."""
        for key in (f"user:{name}", f"addr:{address}"):      # the account first: its owner is told
            if self.in_flight(key) > self.waiting:             # (no await between check and count)
                raise Busy(key)
        keys = sorted({f"user:{name}", f"addr:{address}"})   # locks always in this order: no deadlock
        turns = [self._keys.setdefault(key, _Turns()) for key in keys]
        for t in turns:
            t.in_flight += 1
        held: list[asyncio.Lock] = []
        try:
            for t in turns:
                await t.lock.acquire()
                held.append(t.lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()
            for key, t in zip(keys, turns):
                t.in_flight -= 1
                if t.in_flight == 0:
                    self._keys.pop(key, None)


class Refusals:
    """Refusals from each source address, one written record per address and window (no HTTP here).

    `note` says whether to write a record now (None: only counted) and how many refusals from that
    address came since its previous record. At most `sources` addresses are remembered: past that, those
    whose window has ended are forgotten (`forgotten` counts their refusals never written), and a new
    address is only counted (`forgotten`) until one is. Counted in this process.
    """

    def __init__(self, window: float = 60.0, sources: int = 4096):
        self.window, self.sources = window, sources
        self.forgotten = 0
        self._seen: dict[str, list] = {}     # address -> [start of its window, refusals since its record]

    def note(self, source: str, now: float) -> int | None:
        seen = self._seen.get(source)
        if seen is not None and now - seen[0] < self.window:
            seen[1] += 1
            return None
        if seen is None and len(self._seen) >= self.sources:
            for key, (start, count) in list(self._seen.items()):
                if now - start >= self.window:
                    self.forgotten += count
                    del self._seen[key]
            if len(self._seen) >= self.sources:
                self.forgotten += 1
                return None
        self._seen[source] = [now, 0]
        return seen[1] if seen is not None else 0
