"""A hub embedded in an asyncio program, a dashboard client, and one simulated benchmark run.

python examples/quickstart.py                        # plays one run on a free port, exits
python examples/quickstart.py --serve [--port 8765]  # keeps serving ws://127.0.0.1:8765/api/ws
"""

import argparse
import asyncio
import errno
import json
import sys

from websockets.asyncio.client import connect

import wshub


async def play_run(hub: wshub.Hub) -> None:
    hub.notify_run_started("run-42", "eth_call", git_commit="3f2a9c1")
    for step in range(1, 5):
        await asyncio.sleep(0.05)
        hub.notify_run_progress(
            "run-42",
            "eth_call",
            step / 4,
            elapsed_s=step * 5.0,
            requests_done=step * 2500,
            current_rps=500.0,
            error_rate=0.0,
        )
    hub.notify_run_complete("run-42", "eth_call", duration_s=20.0, total_requests=10_000)
    hub.notify_regression(
        {
            "id": "reg-1",
            "metric": "p95_latency_ms",
            "client": "geth",
            "severity": "high",
            "baseline_value": 2.0,
            "current_value": 3.1,
            "percent_change": 55.0,
        },
        {"id": "run-42", "test_name": "eth_call", "git_commit": "3f2a9c1"},
    )


async def main(serve_forever: bool, port: int) -> None:
    hub = wshub.Hub(wshub.HubConfig(max_clients=10_000))
    async with wshub.serve(hub, "127.0.0.1", port) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/ws"
        if serve_forever:
            print(f"serving {url} (Ctrl-C stops)")
            while True:
                await play_run(hub)
                await asyncio.sleep(5)
        async with connect(url + "?topics=test:eth_call") as dashboard:
            print(await dashboard.recv())  # the greeting
            await play_run(hub)
            for _ in range(7):
                message = json.loads(await dashboard.recv())
                print(message["type"], json.dumps(message.get("data"))[:90])
    print(f"fan-out core: {hub.implementation}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    parser.add_argument(
        "--port",
        type=int,
        help="the port to serve on (default: 8765 with --serve, else a free one)",
    )
    args = parser.parse_args()
    port = args.port if args.port is not None else (8765 if args.serve else 0)
    try:
        asyncio.run(main(args.serve, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        sys.exit(f"port {port} is taken by another program: choose another with --port N")
    except KeyboardInterrupt:
        pass
