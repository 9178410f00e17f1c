"""``python -m wshub serve`` as a user runs it: a real process, real clients, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedOK, InvalidStatus

import wshub

from .helpers import SECRET, client, key_pair, recv_json, send_json

LISTENING = re.compile(r"listening on wss?://127\.0\.0\.1:(\d+)/api/ws")


@asynccontextmanager
async def wshub_serve(*arguments: str, **environment: str) -> AsyncIterator[tuple[Any, int]]:
    """Start ``python -m wshub serve`` on free ports; yields the process and its WS port.

    The lines logged before the ports are known stay readable as ``process.startup_lines``.
    """
    process: Any = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--api-port",
        "0",
        *arguments,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **environment},
    )
    assert process.stderr is not None
    process.startup_lines = []
    try:
        async with asyncio.timeout(20):
            while not (
                match := LISTENING.search(line := (await process.stderr.readline()).decode())
            ):
                if process.returncode is not None:
                    raise AssertionError("wshub serve exited early")
                process.startup_lines.append(line)
        yield process, int(match.group(1))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_serve_until_sigterm_then_close_clients_gracefully() -> None:
    async with wshub_serve("--max-clients", "5", WSHUB_DEFAULT_TOPICS="news") as (process, port):
        async with client(f"ws://127.0.0.1:{port}/api/ws") as (ws, hello):
            assert hello["data"]["topics"] == ["news"]
            process.send_signal(signal.SIGTERM)
            goodbye = await recv_json(ws)
            assert goodbye["type"] == "disconnection"
            with pytest.raises(ConnectionClosedOK) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        async with asyncio.timeout(20):
            assert await process.wait() == 0


async def test_json_logs() -> None:
    async with wshub_serve("--log-format", "json") as (process, port):
        async with client(f"ws://127.0.0.1:{port}/api/ws"):
            pass
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        async with asyncio.timeout(20):
            rest = (await process.stderr.read()).decode().splitlines()
            assert await process.wait() == 0
        entries = [json.loads(line) for line in rest if line.strip()]
        assert {"time", "level", "logger", "message"} <= set(entries[-1])
        assert any("disconnected" in entry["message"] for entry in entries)
        assert entries[-1]["message"] == "stopped"


async def test_bad_setting_stops_start_up_with_its_name() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "serve",
        "--ping-interval",
        "-1",
        stderr=asyncio.subprocess.PIPE,
    )
    _, error = await process.communicate()
    assert process.returncode == 2
    assert "ping_interval must be more than zero seconds" in error.decode()
    assert "--ping-interval" in error.decode()


API = re.compile(r"internal API on (http://127\.0\.0\.1:\d+)")


async def test_publish_command_reaches_a_client_through_the_internal_api(tmp_path: Any) -> None:
    async with wshub_serve("--publish-token", "s3cret") as (process, port):
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while not (match := API.search((await process.stderr.readline()).decode())):
                pass
        url = match.group(1)
        # A command line is readable by every user of the machine: the hub says so.
        lines = process.startup_lines
        assert any("--publish-token is on the command line" in line for line in lines), lines
        data = tmp_path / "run.json"
        data.write_text('{"run_id": "r1", "progress": 0.5}')
        async with client(f"ws://127.0.0.1:{port}/api/ws?topics=run:r1") as (ws, _):
            status, output, _ = await wshub_publish(
                url, "--type", "run_progress", "--data", f"@{data}", "--topics", "run:r1"
            )
            assert status == 0
            message = await recv_json(ws)
            assert output.strip() == f"queued for 1 client (message {message['id']})"
            assert message["type"] == "run_progress"
            assert message["data"] == {"run_id": "r1", "progress": 0.5}
            assert "key" not in message

            # --key: the conflation key travels in the envelope.
            status, _, _ = await wshub_publish(url, "--type", "state", "--key", "run:r1")
            assert status == 0
            assert (await recv_json(ws))["key"] == "run:r1"

            # With a key, running the command twice publishes once.
            keyed = ("--type", "deploy", "--idempotency-key", "deploy-1", "--retry-for", "5")
            answers = [await wshub_publish(url, *keyed) for _ in range(2)]
            await send_json(ws, {"type": "ping"})
            deploy, pong = [await recv_json(ws) for _ in range(2)]
            assert (deploy["type"], pong["type"]) == ("deploy", "pong")
            assert [(status, output.strip()) for status, output, _ in answers] == [
                (0, f"queued for 1 client (message {deploy['id']})"),
                (
                    0,
                    "not sent again: idempotency key 'deploy-1' was already published "
                    f"(message {deploy['id']})",
                ),
            ]

            # --notify: the runner's events, checked as the API checks them.
            notify = ("--notify", "run_failed", "--data")
            bad = '{"run_id": "r1", "test_name": "t", "eror": "x"}'
            status, _, complaint = await wshub_publish(url, *notify, bad)
            assert status == 1 and "did you mean 'error'?" in complaint, complaint
            good = '{"run_id": "r1", "test_name": "t", "error": "x"}'
            assert (await wshub_publish(url, *notify, good))[::2] == (0, "")
            failed = await recv_json(ws)
            assert (failed["type"], failed["data"]["error"]) == ("run_failed", "x")

            status, _, error = await wshub_publish(url, "--type", "x", token="wrong")
            assert status == 1
            assert "(401)" in error


async def wshub_publish(url: str, *arguments: str, token: str = "s3cret") -> tuple[int, str, str]:
    """``wshub publish --url url --token token *arguments``: its status, stdout and stderr."""
    command = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "publish",
        "--url",
        url,
        "--token",
        token,
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await command.communicate()
    assert command.returncode is not None
    return command.returncode, output.decode(), errors.decode()


async def test_the_publish_token_from_a_file_is_not_warned_about(tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    async with wshub_serve("--publish-token-file", str(token)) as (process, _):
        assert process.stderr is not None
        lines = list(process.startup_lines)
        async with asyncio.timeout(20):
            while not API.search(line := (await process.stderr.readline()).decode()):
                lines.append(line)
        assert not any("WARNING" in line for line in lines), lines
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0


async def test_serve_over_tls(certificate: tuple[Any, Any]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(cafile=str(cert))
    async with wshub_serve("--certfile", str(cert), "--keyfile", str(key)) as (process, port):
        async with client(f"wss://127.0.0.1:{port}/api/ws", ssl=context) as (_, hello):
            assert hello["data"]["status"] == "connected"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0


async def test_unreadable_certificate_stops_start_up(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.pem")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "serve",
        "--port",
        "0",
        "--api-port",
        "0",
        "--certfile",
        missing,
        "--keyfile",
        missing,
        stderr=asyncio.subprocess.PIPE,
    )
    _, error = await process.communicate()
    assert process.returncode == 2
    assert f"--certfile {missing}: cannot read it" in error.decode()


async def test_workers_need_redis() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wshub", "serve", "--workers", "2", stderr=asyncio.subprocess.PIPE
    )
    _, error = await process.communicate()
    assert process.returncode == 2
    assert "workers must be 1 unless redis_url is set" in error.decode()
    assert "(from --workers)" in error.decode()


STARTED = re.compile(r"started worker (\d)/2 \(pid (\d+)\)")


async def test_a_worker_that_dies_stops_the_others_and_fails_the_server() -> None:
    # Nothing answers on port 1: the workers serve without Redis, waiting for it.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wshub",
        "serve",
        *("--host", "127.0.0.1", "--port", "0", "--api-port", "0"),
        *("--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    workers: dict[int, int] = {}
    try:
        async with asyncio.timeout(20):
            while not LISTENING.search(line := (await process.stderr.readline()).decode()):
                assert line, "wshub serve exited early"
                if started := STARTED.search(line):
                    workers[int(started.group(1))] = int(started.group(2))
            assert set(workers) == {1, 2}
            os.kill(workers[2], signal.SIGKILL)
            rest = (await process.stderr.read()).decode()
            assert await process.wait() == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert f"worker 2/2 (pid {workers[2]}) ended unexpectedly (killed by SIGKILL)" in rest
    assert "worker 1/2: stopped" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(workers[1], 0)


def run_wshub(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wshub", *arguments], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    result = run_wshub("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"wshub {wshub.__version__}")


def test_help_reads_as_plain_text() -> None:
    text = run_wshub("serve", "--help").stdout
    assert ":mod:" not in text and "``" not in text
    assert "(see wshub.backplane); unset runs this hub alone" in " ".join(text.split())


@pytest.mark.parametrize("flag", ["--port", "--api-port"])
def test_a_port_in_use_is_named_with_its_flag(flag: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        other = "--api-port" if flag == "--port" else "--port"
        result = run_wshub("serve", "--host", "127.0.0.1", flag, str(port), other, "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"wshub: error: {flag} {port}: 127.0.0.1:{port} is in use by another program; "
        f"choose another port with {flag} (0 picks a free one)"
    )
    assert "Traceback" not in result.stderr


def test_a_host_this_machine_does_not_have_is_named() -> None:
    # 192.0.2.0/24 is TEST-NET-1: documentation only, on no interface.
    result = run_wshub("serve", "--host", "192.0.2.7", "--port", "0", "--api-port", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "wshub: error: --host 192.0.2.7: no interface of this machine has that address"
    )


def test_tls_files_that_are_not_pem_are_named(tmp_path: Any) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    result = run_wshub("serve", "--certfile", str(cert), "--keyfile", str(key))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"wshub: error: --certfile {cert} / --keyfile {key}: not a PEM certificate and its "
            "private key"
        )
    )


QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_the_quickstart_plays_a_run_on_a_free_port() -> None:
    # Whatever holds 8765 on this machine, the README's first command works.
    result = subprocess.run(
        [sys.executable, str(QUICKSTART)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    types = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert "run_complete" in types and "regression_detected" in types, result.stdout


def test_the_quickstart_says_which_port_is_taken() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(QUICKSTART), "--serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert (
        result.stderr == f"port {port} is taken by another program: choose another with --port N\n"
    )


def wshub_token(*arguments: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``wshub token *arguments`` as a process: its status, stdout and stderr."""
    environment = {k: v for k, v in os.environ.items() if k != "WSHUB_AUTH_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "wshub", "token", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
        check=False,
    )
    return done.returncode, done.stdout.strip(), done.stderr


def test_token_command_mints_what_the_hub_verifies(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    mint = ("--sub", "alice", "--topics", "test:eth_*, run:*", "--ttl", "1h")
    status, token, _ = wshub_token(*mint, "--auth-secret-file", str(secret_file))
    assert status == 0
    principal = wshub.TokenVerifier(secret=SECRET).verify(token)
    assert (principal.identity, principal.grants.patterns) == ("alice", ("test:eth_*", "run:*"))
    status, token, _ = wshub_token(*mint, env={"WSHUB_AUTH_SECRET": SECRET})
    assert status == 0 and wshub.TokenVerifier(secret=SECRET).verify(token).identity == "alice"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_token_command_signs_with_a_private_key(tmp_path: Path, algorithm: str) -> None:
    private, public = key_pair(algorithm)
    key_file = tmp_path / "key.pem"
    key_file.write_text(private)
    status, token, error = wshub_token(
        "--sub", "ci", "--topics", "*", "--private-key", str(key_file), "--algorithm", algorithm
    )
    assert status == 0, error
    assert wshub.TokenVerifier(public_key=public).verify(token).grants.allows("*")


def test_token_command_errors_name_the_flag(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too short")
    cases = [
        ((), "no key: give --auth-secret-file, WSHUB_AUTH_SECRET or --private-key"),
        (("--auth-secret-file", str(tmp_path / "missing")), "--auth-secret-file: cannot read"),
        (("--auth-secret-file", str(short)), "--auth-secret-file: an HS256 secret must be"),
        (("--ttl", "soon"), "--ttl: 'soon' is not a duration"),
        (("--algorithm", "ES256"), "--algorithm: RS256 and ES256 sign with --private-key"),
    ]
    for extra, expected in cases:
        status, out, error = wshub_token("--topics", "*", *extra)
        assert (status, out) == (2, ""), (extra, error)
        assert expected in error, (extra, error)
        assert "Traceback" not in error
    status, _, error = wshub_token("--topics", "a*b", env={"WSHUB_AUTH_SECRET": SECRET})
    assert status == 2 and "--topics: topic pattern 'a*b'" in error, error


async def test_serve_with_auth_required_admits_a_minted_token_and_never_logs_it(
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    mint = ("--sub", "team-a", "--topics", "test:team-a-*", "--ttl", "10m")
    status, token, _ = await asyncio.to_thread(
        wshub_token, *mint, "--auth-secret-file", str(secret_file)
    )
    assert status == 0
    arguments = ("--auth-required", "--auth-secret-file", str(secret_file), "--log-level", "debug")
    async with wshub_serve(*arguments) as (process, port):
        url = f"ws://127.0.0.1:{port}/api/ws"
        with pytest.raises(InvalidStatus) as refused:
            async with client(url):
                pass
        assert refused.value.response.status_code == 401
        query = f"?topics=test:team-a-eth,test:team-b-eth&token={token}"
        async with client(url + query) as (ws, hello):
            assert hello["data"]["topics"] == ["test:team-a-eth"]
            error = await recv_json(ws)
            assert error["error"]["details"]["forbidden"] == ["test:team-b-eth"]
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        async with asyncio.timeout(20):
            rest = (await process.stderr.read()).decode()
            logged = [*process.startup_lines, *rest.splitlines(keepends=True)]
            assert await process.wait() == 0
    text = "".join(logged)
    assert "client" in text and "team-a" in text  # connections are logged, by identity,
    assert token not in text and token.split(".")[2] not in text  # and the token never
    assert SECRET not in text
    assert not any("auth_required is off" in line for line in logged)


def test_serve_warns_of_secrets_on_the_command_line_and_of_an_open_public_port() -> None:
    from wshub.cli import startup_warnings
    from wshub.settings import load_settings

    flags = {"auth_secret": SECRET, "publish_token": "s3cret", "host": "0.0.0.0"}
    warnings = startup_warnings(flags, load_settings(flags, environ={}))
    assert [warning.split(" ", 1)[0] for warning in warnings] == [
        "--publish-token",
        "--auth-secret",
        "auth_required",
    ]
    assert all(SECRET not in warning and "s3cret" not in warning for warning in warnings)
    quiet = {"host": "127.0.0.1", "auth_required": "true", "auth_secret": None}
    settings = load_settings(quiet, environ={"WSHUB_AUTH_SECRET": SECRET})
    assert startup_warnings(quiet, settings) == []
