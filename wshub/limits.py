"""What one client may send and hold, each rule once.

The rate limit, sans-I/O and the same for every transport: :class:`wshub.clients.Clients`
charges a client's bucket for each message it handles, and a transport charges control
frames (pings, pongs) through :meth:`wshub.session.ClientSession.control_received` where it
sees them.

Over the limit, a message is refused with an ``error`` 429 and not acted on; a client that
keeps sending while refused (as many refusals in a row as its burst) is closed with 1008, so
that neither its messages nor the hub's answers to them can take more than a bounded share of
the loop.

Also here: the lean server's bounds on what it reads of a connection, the address a client
connects from through trusted proxies (``max_connections_per_ip``), and the kernel send
buffer of a client's socket. docs/security.md explains each limit and its default.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the session port imports the config, which imports this
    from .session import HandshakeRequest

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
    "client_address",
    "proxy_networks",
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

    Time comes from the caller (monotonic seconds), so the rule is testable without
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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(proxies: Sequence[str]) -> tuple[Network, ...]:
    """``trusted_proxies`` as networks (an address is a network of one).

    Raises:
        ValueError: An entry is not an IP address or network.
    """
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def _peer_host(remote_address: str) -> str:
    """The host of ``host:port`` or ``[host]:port``."""
    host = remote_address.rpartition(":")[0] if ":" in remote_address else remote_address
    return host.removeprefix("[").removesuffix("]")


def _is_trusted(host: str, proxies: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in proxies)


def client_address(request: HandshakeRequest, proxies: Sequence[Network]) -> str:
    """The address a client connects from, for ``max_connections_per_ip``.

    The peer's address, unless the peer is one of ``proxies``: then ``X-Forwarded-For`` is
    read from the right (each proxy appends the address it received from), skipping trusted
    proxies, and the first other address is the client's. What a client writes into the
    header itself sits further left and is never reached through an untrusted hop.
    """
    host = _peer_host(request.remote_address)
    if not proxies or not _is_trusted(host, proxies):
        return host
    forwarded = request.headers.get("x-forwarded-for", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, proxies):
            return hop[:64]
        host = hop
    return host
