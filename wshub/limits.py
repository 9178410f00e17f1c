"""What one client may send: a token bucket per client, and what each thing it sends costs.

Sans-I/O and the same for every transport: :class:`wshub.clients.Clients` charges a client's
bucket for each message it handles, and a transport charges control frames (pings, pongs)
through :meth:`wshub.session.ClientSession.control_received` where it sees them.

Over the limit, a message is refused with an ``error`` 429 and not acted on; a client that
keeps sending while refused (as many refusals in a row as its burst) is closed with 1008, so
that neither its messages nor the hub's answers to them can take more than a bounded share of
the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

__all__ = [
    "CONTROL_FRAME_COST",
    "MAX_FRAGMENTS",
    "MAX_REQUEST_HEAD",
    "MAX_REQUEST_HEADERS",
    "MESSAGE_COST",
    "POLICY_VIOLATION",
    "RATE_LIMITED",
    "READ_BUDGET",
    "RESUME_COST",
    "RateLimit",
    "set_send_buffer",
]

#: What any message costs, whatever it turns out to be (malformed ones included).
MESSAGE_COST = 1.0
#: A control frame (ping, pong): cheap for the hub, but not free.
CONTROL_FRAME_COST = 1.0
#: A ``subscribe`` with ``since`` reads the history and queues a replay: it costs this in all.
RESUME_COST = 5.0
#: The ``error`` code of a refused message.
RATE_LIMITED = 429
#: The close code of a client that keeps sending while refused (RFC 6455 7.4.1).
POLICY_VIOLATION = 1008

# What the lean transport reads and holds for one connection (the other servers bound
# their own reading).
#: Bytes of one connection handled per loop iteration; the rest waits, its reading paused,
#: so that no client holds the loop however much it sends at once.
READ_BUDGET = 16 * 1024
#: The largest opening request head (request line and headers); larger gets 431.
MAX_REQUEST_HEAD = 16 * 1024
#: Most header lines in the opening request; more gets 431.
MAX_REQUEST_HEADERS = 64
#: Most frames in one fragmented message (empty ones count); more closes with 1009.
MAX_FRAGMENTS = 1024


class RateLimit:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` per second.

    Time comes from the caller (the event loop's clock), so the rule is testable without
    waiting. ``rate`` 0 means no limit: every ``take`` succeeds.

    Attributes:
        refusals: Refusals since the last success: the client's strikes.
    """

    __slots__ = ("burst", "rate", "refusals", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now
        self.refusals = 0

    def take(self, cost: float, now: float) -> bool:
        """Spend ``cost`` tokens if the bucket holds them; False (a strike) otherwise."""
        if not self.rate:
            return True
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens >= cost:
            self.tokens = tokens - cost
            self.refusals = 0
            return True
        self.tokens = tokens
        self.refusals += 1
        return False

    @property
    def exhausted(self) -> bool:
        """The client was refused as many times in a row as its burst: it keeps going."""
        return self.refusals >= self.burst


def set_send_buffer(transport: asyncio.BaseTransport, size: int) -> None:
    """Fix the kernel send buffer of ``transport``'s socket at ``size`` bytes
    (``socket_send_buffer``), so that what a slow client pins in the kernel is bounded too;
    0 leaves the kernel's autotuning alone. Linux doubles the value for its bookkeeping and
    caps it at ``net.core.wmem_max``."""
    if not size:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # a socket already closed: nothing to bound
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
