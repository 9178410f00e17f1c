"""How long one client's flood keeps another client waiting, on the lean server.

``python -m benchmarks.flood [asyncio|uvloop]``: a victim subscribed to ``ticks`` (one every
10 ms) while an attacker writes 200,000 valid messages (4 MiB) in one go, with the rate
limit off so that all of them are handled. Prints how long the flood took and the victim's
longest and median wait between two ticks. docs/security.md quotes its figures.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import orjson
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode

import wshub

FLOOD = 200_000


async def main() -> None:
    config = wshub.HubConfig(log_connection_events=False, client_message_rate=0)
    hub = wshub.Hub(config)
    message = Frame(Opcode.TEXT, b'{"type":"pong"}').serialize(mask=True)
    ping = Frame(Opcode.TEXT, b'{"type":"ping"}').serialize(mask=True)
    async with wshub.serve(hub, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/ws"
        async with connect(url + "?topics=ticks") as victim, connect(url + "?topics=-") as flood:
            await victim.recv()
            await flood.recv()
            stop = asyncio.Event()

            async def tick() -> None:
                sequence = 0
                while not stop.is_set():
                    hub.broadcast_to_subscribers("tick", sequence, ("ticks",))
                    sequence += 1
                    await asyncio.sleep(0.01)

            ticking = asyncio.create_task(tick())
            await victim.recv()
            # Straight to the socket: the whole flood in one write, then a ping whose pong
            # says the hub has handled every message before it.
            flood.transport.write(message * FLOOD + ping)
            answered = asyncio.create_task(flood.recv())
            gaps: list[float] = []
            started = last = time.monotonic()
            while not answered.done():
                await victim.recv()
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            stop.set()
            await ticking
            assert orjson.loads(await answered)["type"] == "pong"
    print(
        f"{FLOOD:,} messages handled in {last - started:.2f} s; the victim's longest wait "
        f"{max(gaps) * 1000:.0f} ms, median {statistics.median(gaps) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["uvloop"]:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
