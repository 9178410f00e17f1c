"""A hub embedded in an asyncio program, a dashboard client, and one simulated benchmark run.

python examples/quickstart.py            # plays one run, prints what the client saw, exits
python examples/quickstart.py --serve    # keeps serving ws://127.0.0.1:8765/api/ws
"""

import asyncio
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


async def main() -> None:
    hub = wshub.Hub(wshub.HubConfig(max_clients=10_000))
    async with wshub.serve(hub, "127.0.0.1", 8765):
        if "--serve" in sys.argv:
            print("serving ws://127.0.0.1:8765/api/ws (Ctrl-C stops)")
            while True:
                await play_run(hub)
                await asyncio.sleep(5)
        async with connect("ws://127.0.0.1:8765/api/ws?topics=test:eth_call") as dashboard:
            print(await dashboard.recv())  # the greeting
            await play_run(hub)
            for _ in range(7):
                message = json.loads(await dashboard.recv())
                print(message["type"], json.dumps(message.get("data"))[:90])
    print(f"fan-out core: {hub.implementation}")


if __name__ == "__main__":
    asyncio.run(main())
