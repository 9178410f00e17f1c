"""wshub: a WebSocket fan-out hub that serializes and frames each event once.

Embed it in an asyncio service::

    import asyncio
    import wshub

    async def main():
        hub = wshub.Hub(wshub.HubConfig(max_clients=10_000))
        async with wshub.serve(hub, "127.0.0.1", 8080):
            hub.notify_run_progress("run-42", "eth_call", 0.5, elapsed_s=30.0,
                                    requests_done=15_000, current_rps=500.0, error_rate=0.0)
            await asyncio.Future()

    asyncio.run(main())
"""

from ._version import __version__
from .auth import (
    AuthenticateHook,
    AuthUnavailable,
    Grants,
    Principal,
    TokenRefused,
    TokenVerifier,
    mint_token,
)
from .backplane import Backplane, BackplaneUnavailable, MemoryBackplane, MemoryStream
from .config import HubConfig
from .fanout import IMPLEMENTATION
from .hub import BroadcastBufferFull, Hub, Published
from .publisher import Publisher, PublishError
from .redis_backplane import RedisBackplane
from .runner import HistoricRun, Regression
from .session import (
    Admission,
    ClientSession,
    ClientTransport,
    FrameKind,
    HandshakeRequest,
    Refusal,
)
from .transports import (
    AsgiApp,
    aiohttp_events_handler,
    aiohttp_handler,
    asgi_app,
    serve,
    server_options,
)
from .wire import MessageTooLarge, MessageType, ProtocolError

__all__ = [
    "IMPLEMENTATION",
    "Admission",
    "AsgiApp",
    "AuthUnavailable",
    "AuthenticateHook",
    "Backplane",
    "BackplaneUnavailable",
    "BroadcastBufferFull",
    "ClientSession",
    "ClientTransport",
    "FrameKind",
    "Grants",
    "HandshakeRequest",
    "HistoricRun",
    "Hub",
    "HubConfig",
    "MemoryBackplane",
    "MemoryStream",
    "MessageTooLarge",
    "MessageType",
    "Principal",
    "ProtocolError",
    "PublishError",
    "Published",
    "Publisher",
    "RedisBackplane",
    "Refusal",
    "Regression",
    "TokenRefused",
    "TokenVerifier",
    "__version__",
    "aiohttp_events_handler",
    "aiohttp_handler",
    "asgi_app",
    "mint_token",
    "serve",
    "server_options",
]
