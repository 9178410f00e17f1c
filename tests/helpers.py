"""Small tools for talking to a hub over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import ClientConnection, connect

import wshub

TIMEOUT = 5.0


@dataclasses.dataclass
class HubServer:
    hub: wshub.Hub
    server: Any  # the transport's listening server, where it has one
    url: str


async def recv_json(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next message from the hub, decoded; fails the test after ``timeout``."""
    async with asyncio.timeout(timeout):
        message = await ws.recv()
    decoded: dict[str, Any] = json.loads(message)
    return decoded


async def send_json(ws: ClientConnection, message: Any) -> None:
    await ws.send(json.dumps(message))


@contextlib.asynccontextmanager
async def client(
    url: str, **options: Any
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    """Connect and read the ``connection`` greeting; yields the socket and the greeting."""
    async with connect(url, **options) as ws:
        hello = await recv_json(ws)
        assert hello["type"] == "connection", hello
        yield ws, hello


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait for ``condition`` to hold, checking every few milliseconds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def subscribe(ws: ClientConnection, *topics: str) -> list[str]:
    """Subscribe and return the whole topic set the hub answers with."""
    await send_json(ws, {"type": "subscribe", "data": {"topics": list(topics)}})
    reply = await recv_json(ws)
    assert reply["type"] == "subscribed", reply
    result: list[str] = reply["data"]["topics"]
    return result


SECRET = "a-secret-of-at-least-thirty-two-bytes!"
"""An HS256 secret for subscriber tokens in tests."""


def key_pair(kind: str) -> tuple[str, str]:
    """A fresh (private, public) PEM pair: RSA 2048 or EC P-256."""
    private = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem
