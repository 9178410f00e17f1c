"""Who may listen to what, over real sockets on every transport and both cores: subscriber
tokens, topic grants, expiry and refresh, the ``authenticate`` hook (wshub/auth.py, the
admission in wshub/hub.py and the grants in wshub/clients.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

import wshub
from wshub.auth import Grants, JwksVerifier, Principal, TokenRefused, mint_token
from wshub.session import HandshakeRequest

from .helpers import SECRET, TIMEOUT, client, key_pair, recv_json, send_json, subscribe
from .test_resume import nothing_more, published

TEAM_A = ["test:team-a-*"]


def token(
    sub: str | None = "alice",
    topics: list[str] | None = None,
    ttl: float = 3600.0,
    key: Any = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A subscriber token whose ``exp`` may be a fraction of a second away (mint_token's
    are whole seconds)."""
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    body: dict[str, Any] = {
        "exp": time.time() + ttl,
        "topics": TEAM_A if topics is None else topics,
    }
    if sub is not None:
        body["sub"] = sub
    body.update(claims)
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


async def refused(url: str, **options: Any) -> Any:
    """The HTTP response of a handshake the hub must refuse."""
    with pytest.raises(InvalidStatus) as refusal:
        async with connect(url, **options):
            pass
    return refusal.value.response


async def next_of(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next message, which must be of type ``kind``."""
    message = await recv_json(ws)
    assert message["type"] == kind, message
    return message


# Admission: 401 before the upgrade


async def test_a_required_token_refuses_handshakes_without_a_valid_one_with_401(
    hub_server: Any,
) -> None:
    config = {"auth_required": True, "auth_secret": SECRET, "auth_audience": "wshub"}
    async with hub_server(**config) as served:
        bad = {
            "missing": "",
            "malformed": "?token=not-a-jwt",
            "signature": "?token="
            + token(aud="wshub", key="another-secret-of-thirty-two-bytes!!"),
            "expired": "?token=" + token(aud="wshub", ttl=-60),
            "audience": "?token=" + token(aud="someone-else"),
        }
        for reason, query in bad.items():
            response = await refused(served.url + query)
            assert response.status_code == 401, reason
            challenge = response.headers["WWW-Authenticate"]
            assert challenge.startswith('Bearer realm="wshub"'), challenge
            assert ("invalid_token" in challenge) is (reason != "missing"), challenge
            body = response.body.decode()
            assert body.strip(), reason  # says why, for people
            if query:
                assert query.removeprefix("?token=") not in body + challenge
        assert served.hub.stats()["refused_handshakes"] == dict.fromkeys(bad, 1)
        assert served.hub.client_count == 0
        query = "?topics=test:team-a-eth&token=" + token(aud="wshub")
        async with client(served.url + query) as (ws, _):
            assert served.hub.client_info()[0]["identity"] == "alice"
            await nothing_more(ws)


async def test_the_token_may_come_as_a_bearer_header_or_a_cookie(hub_server: Any) -> None:
    async with hub_server(auth_required=True, auth_secret=SECRET) as served:
        bearer = {"Authorization": "Bearer " + token(sub="bob")}
        cookie = {"Cookie": "theme=dark; wshub_token=" + token(sub="carol")}
        async with (
            client(served.url, additional_headers=bearer),
            client(served.url, additional_headers=cookie),
        ):
            identities = sorted(info["identity"] for info in served.hub.client_info())
            assert identities == ["bob", "carol"]


async def test_without_auth_required_no_token_is_anonymous_but_a_bad_one_is_refused(
    hub_server: Any,
) -> None:
    async with hub_server(auth_secret=SECRET) as served:
        async with client(served.url) as (_ws, hello):
            assert hello["data"]["topics"] == ["*"]  # as before tokens existed
            [info] = served.hub.client_info()
            assert (info["identity"], info["token_expires_at"]) == (None, None)
        response = await refused(served.url + "?token=" + token(ttl=-60))
        assert response.status_code == 401


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_asymmetric_tokens_verify_with_the_configured_public_key(
    hub_server: Any, algorithm: str, tmp_path: Any
) -> None:
    private, public = key_pair(algorithm)
    key_file = tmp_path / "public.pem"
    key_file.write_text(public)
    async with hub_server(auth_required=True, auth_public_key=str(key_file)) as served:
        good = token(key=private, algorithm=algorithm)
        async with client(served.url + "?topics=test:team-a-eth&token=" + good) as (ws, _):
            await nothing_more(ws)
        # An HS256 token: the configured key decides the algorithm, so it is refused.
        forged = jwt.encode({"exp": time.time() + 60}, SECRET, algorithm="HS256")
        assert (await refused(served.url + "?token=" + forged)).status_code == 401
        assert served.hub.stats()["refused_handshakes"] == {"signature": 1}


# Topic grants


async def test_grants_filter_url_topics_and_subscribes_with_a_403_naming_the_rest(
    hub_server: Any,
) -> None:
    async with hub_server(auth_required=True, auth_secret=SECRET) as served:
        query = "?topics=test:team-a-eth,test:team-b-eth&token=" + token()
        async with client(served.url + query) as (ws, hello):
            assert hello["data"]["topics"] == ["test:team-a-eth"]
            error = await next_of(ws, "error")
            assert error["error"]["code"] == 403
            assert error["error"]["details"] == {
                "forbidden": ["test:team-b-eth"],
                "allowed": TEAM_A,
            }
            assert "test:team-b-eth" in error["error"]["message"]
            await send_json(
                ws, {"type": "subscribe", "data": {"topics": ["test:team-a-x", "run:1", "*"]}}
            )
            error = await next_of(ws, "error")
            assert (error["error"]["code"], error["error"]["details"]["forbidden"]) == (
                403,
                ["run:1", "*"],
            )
            subscribed = await next_of(ws, "subscribed")
            assert subscribed["data"]["topics"] == ["test:team-a-eth", "test:team-a-x"]
            served.hub.broadcast_to_subscribers("result", "b", ["test:team-b-eth"])
            served.hub.broadcast_to_subscribers("result", "run", ["run:1"])
            served.hub.broadcast_to_subscribers("result", "a", ["test:team-a-x"])
            [message] = await published(ws, 1)
            assert message["data"] == "a"
            await nothing_more(ws)


async def test_only_a_client_granted_star_may_subscribe_to_star(hub_server: Any) -> None:
    async with hub_server(auth_required=True, auth_secret=SECRET) as served:
        # default_topics is "*": a restricted client starts with nothing, and is told.
        async with client(served.url + "?token=" + token()) as (ws, hello):
            assert hello["data"]["topics"] == []
            error = await next_of(ws, "error")
            assert error["error"]["details"]["forbidden"] == ["*"]
            # A prefix grant that happens to cover every topic name is still no "*".
            await send_json(ws, {"type": "subscribe", "data": {"topics": ["*"]}})
            assert (await next_of(ws, "error"))["error"]["code"] == 403
            assert (await next_of(ws, "subscribed"))["data"]["topics"] == []
        async with client(served.url + "?token=" + token(topics=["*"])) as (ws, hello):
            assert hello["data"]["topics"] == ["*"]
            await nothing_more(ws)


async def test_a_replay_never_carries_a_forbidden_topic(hub_server: Any) -> None:
    async with hub_server(auth_required=True, auth_secret=SECRET) as served:
        hub = served.hub
        async with client(served.url + "?topics=*&token=" + token(topics=["*"])) as (ws, _):
            hub.broadcast_to_subscribers("m", "a1", ["test:team-a-eth"])
            hub.broadcast_to_subscribers("m", "b1", ["test:team-b-eth"])
            hub.broadcast_to_subscribers("m", "a2", ["test:team-a-eth", "test:team-b-eth"])
            hub.broadcast_to_subscribers("m", "b2", ["test:team-b-eth"])
            first, *_ = await published(ws, 4)
        since = first["id"]
        both = "test:team-a-eth,test:team-b-eth"
        query = f"?topics={both}&since={since}&token={token()}"
        async with client(served.url + query) as (ws, hello):
            assert hello["data"]["recovered"] is True
            assert (await next_of(ws, "error"))["error"]["details"]["forbidden"] == [
                "test:team-b-eth"
            ]
            assert [message["data"] for message in await published(ws, 1)] == ["a2"]
            await nothing_more(ws)
            # The same through subscribe with since, and with "*".
            await send_json(
                ws,
                {
                    "type": "subscribe",
                    "data": {"topics": ["test:team-b-eth", "*"], "since": since},
                },
            )
            assert (await next_of(ws, "error"))["error"]["code"] == 403
            subscribed = await next_of(ws, "subscribed")
            assert subscribed["data"]["topics"] == ["test:team-a-eth"]
            # What the greeting replayed comes again (it did not arrive live); b1, b2 never.
            assert [message["data"] for message in await published(ws, 1)] == ["a2"]
            await nothing_more(ws)


async def test_replays_from_redis_on_another_hub_carry_only_granted_topics(
    lean_server: Any, redis_server: Any
) -> None:
    config = {"auth_required": True, "auth_secret": SECRET, "redis_url": redis_server.url}
    async with lean_server(**config) as first:
        ids = [
            (await first.hub.publish("m", data, topic)).id
            for data, topic in [("a1", "test:team-a-eth"), ("b1", "test:team-b-eth")]
        ]
        ids.append((await first.hub.publish("m", "a2", "test:team-a-eth")).id)
        # A hub started after the publishes has them only in Redis.
        async with lean_server(**config) as second:
            both = "test:team-a-eth,test:team-b-eth"
            query = f"?topics={both}&since={ids[0]}&token={token()}"
            async with client(second.url + query) as (ws, hello):
                assert hello["data"]["recovered"] is True
                assert (await next_of(ws, "error"))["error"]["code"] == 403
                assert [message["id"] for message in await published(ws, 1)] == [ids[2]]
                await nothing_more(ws)


# Expiry and refresh


async def test_an_expired_token_is_told_then_closed_with_4001_unless_refreshed(
    hub_server: Any,
) -> None:
    config = {"auth_secret": SECRET, "auth_leeway": 0, "auth_expiry_grace": 0.5}
    async with hub_server(**config) as served:
        # Long enough for both handshakes, even the first of a process (imports, key setup).
        expiring = token(ttl=1.5, topics=["test:team-a-*"])
        async with (
            client(served.url + "?topics=test:team-a-eth&token=" + expiring) as (lapsing, _),
            client(served.url + "?topics=test:team-a-eth&token=" + expiring) as (renewing, _),
        ):
            for ws in (lapsing, renewing):
                told = await next_of(ws, "token_expired")
                assert told["data"]["grace"] == 0.5
                assert told["data"]["expired_at"].endswith("Z")
            fresh = token(ttl=3600, topics=["test:team-a-*"])
            await send_json(renewing, {"type": "refresh", "data": {"token": fresh}})
            refreshed = await next_of(renewing, "refreshed")
            assert refreshed["data"]["identity"] == "alice"
            assert refreshed["data"]["topics"] == ["test:team-a-eth"]
            assert refreshed["data"]["dropped"] == []
            with pytest.raises(ConnectionClosedError) as closed:
                await recv_json(lapsing, timeout=TIMEOUT)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "token expired")
            # Both graces ended at the same moment: the renewed client outlived its own.
            served.hub.broadcast_to_subscribers("m", "still here", ["test:team-a-eth"])
            assert [message["data"] for message in await published(renewing, 1)] == ["still here"]
            [info] = served.hub.client_info()
            assert info["token_expires_at"] > refreshed["data"]["expires_at"][:10]


async def test_a_refresh_with_narrower_grants_drops_the_topics_they_no_longer_allow(
    hub_server: Any,
) -> None:
    async with hub_server(auth_secret=SECRET) as served:
        query = "?topics=run:1,test:team-a-eth&token=" + token(topics=["run:*", "test:*"])
        async with client(served.url + query) as (ws, _):
            await send_json(ws, {"type": "refresh", "data": {"token": token(topics=TEAM_A)}})
            # Messages sent behind the refresh wait for it, in order.
            await send_json(ws, {"type": "subscribe", "data": {"topics": ["run:2"]}})
            refreshed = await next_of(ws, "refreshed")
            assert refreshed["data"]["topics"] == ["test:team-a-eth"]
            assert refreshed["data"]["dropped"] == ["run:1"]
            assert (await next_of(ws, "error"))["error"]["details"]["forbidden"] == ["run:2"]
            assert (await next_of(ws, "subscribed"))["data"]["topics"] == ["test:team-a-eth"]
            served.hub.broadcast_to_subscribers("m", "run", ["run:1"])
            served.hub.broadcast_to_subscribers("m", "team", ["test:team-a-eth"])
            assert [message["data"] for message in await published(ws, 1)] == ["team"]


async def test_a_refused_refresh_is_an_error_and_the_connection_lives_on(
    hub_server: Any,
) -> None:
    query = "?topics=test:team-a-eth&token=" + token()
    async with hub_server(auth_secret=SECRET) as served, client(served.url + query) as (ws, _):
        cases = [
            (token(ttl=-60), 401, "expired"),
            (token(key="another-secret-of-thirty-two-bytes!!"), 401, "signature"),
            (token(sub="mallory"), 403, "identity"),
        ]
        for bad, code, reason in cases:
            await send_json(ws, {"type": "refresh", "data": {"token": bad}})
            error = (await next_of(ws, "error"))["error"]
            assert (error["code"], error["details"]["reason"]) == (code, reason)
            assert bad not in json.dumps(error)
        await send_json(ws, {"type": "refresh", "data": {"token": ""}})
        error = (await next_of(ws, "error"))["error"]
        assert error["code"] == 400 and "refresh needs" in error["message"]
        await nothing_more(ws)
        assert served.hub.client_info()[0]["identity"] == "alice"


async def test_a_refresh_on_a_hub_that_verifies_no_tokens_is_a_400(hub_server: Any) -> None:
    async with hub_server() as served, client(served.url) as (ws, _):
        await send_json(ws, {"type": "refresh", "data": {"token": token()}})
        error = (await next_of(ws, "error"))["error"]
        assert (error["code"], error["details"]["reason"]) == (400, "unsupported")
        await nothing_more(ws)


# The authenticate hook


def team_hook(request: HandshakeRequest) -> Principal | None:
    """Admits a client whose X-Team header names a team, to that team's tests."""
    team = request.headers.get("x-team")
    if team is None:
        return None
    if team == "banned":
        raise TokenRefused("banned", "this team may not connect")
    return Principal(f"team {team}", Grants.of([f"test:team-{team}-*"]))


async def async_team_hook(request: HandshakeRequest) -> Principal | None:
    await asyncio.sleep(0)  # answers on a later loop iteration, as a database would
    return team_hook(request)


@pytest.mark.parametrize("hook", [team_hook, async_team_hook], ids=["sync", "async"])
async def test_the_hook_admits_refuses_or_falls_back_to_tokens(hub_server: Any, hook: Any) -> None:
    config = {"auth_required": True, "auth_secret": SECRET, "authenticate": hook}
    async with hub_server(**config) as served:
        headers = {"X-Team": "b"}
        async with client(served.url + "?topics=test:team-b-eth", additional_headers=headers) as (
            _ws,
            hello,
        ):
            assert hello["data"]["topics"] == ["test:team-b-eth"]
            assert served.hub.client_info()[0]["identity"] == "team b"
        response = await refused(served.url, additional_headers={"X-Team": "banned"})
        assert (response.status_code, response.body) == (401, b"this team may not connect\n")
        async with client(served.url + "?token=" + token()):  # no X-Team: the token decides
            assert served.hub.client_info()[0]["identity"] == "alice"
        assert (await refused(served.url)).status_code == 401
        assert served.hub.stats()["refused_handshakes"] == {"banned": 1, "missing": 1}


async def test_a_hook_that_hangs_or_fails_refuses_with_503_and_the_hub_serves_on(
    hub_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    never = asyncio.Event()

    async def hook(request: HandshakeRequest) -> Any:
        kind = request.headers.get("x-fail")
        if kind == "hang":
            await never.wait()
        if kind == "raise":
            raise RuntimeError("the user database is down")
        if kind == "wrong":
            return "alice"
        return None

    async with hub_server(authenticate=hook, auth_timeout=0.2) as served:
        with caplog.at_level(logging.WARNING, logger="wshub"):
            for kind in ("hang", "raise", "wrong"):
                response = await refused(served.url, additional_headers={"X-Fail": kind})
                assert response.status_code == 503, kind
        assert served.hub.stats()["refused_handshakes"] == {"hook_timeout": 1, "hook_error": 2}
        assert "longer than auth_timeout" in caplog.text
        assert "the user database is down" in caplog.text  # the operator's bug, with its cause
        assert "returned a str" in caplog.text
        async with client(served.url) as (ws, _):
            await nothing_more(ws)


# Credentials stay out of the logs


async def test_tokens_never_appear_in_the_logs(
    hub_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = {"auth_required": True, "auth_secret": SECRET, "log_connection_events": True}
    good, expired = token(), token(ttl=-60)
    async with hub_server(**config) as served:
        with caplog.at_level(logging.DEBUG):
            await refused(served.url + "?token=" + expired)
            async with client(served.url + "?topics=test:team-a-eth&token=" + good) as (ws, _):
                await send_json(ws, {"type": "refresh", "data": {"token": expired}})
                await next_of(ws, "error")
                await send_json(ws, {"type": "refresh", "data": {"token": good}})
                await next_of(ws, "refreshed")
    # The hub's own lines (a client library logs its own request line, token and all).
    logged = "\n".join(
        record.getMessage() for record in caplog.records if record.name.startswith("wshub")
    )
    assert "alice" in logged  # the identity is logged,
    for credential in (good, expired, good.split(".")[2], expired.split(".")[2]):
        assert credential not in logged  # the token is not


# Key sets


@contextlib.asynccontextmanager
async def key_set_server(keys: dict[str, Any]) -> AsyncIterator[str]:
    """Serves ``keys`` (kid -> public key object, changed by the test) as a JWKS."""

    async def jwks(request: web.Request) -> web.Response:
        documents = []
        for kid, public in keys.items():
            algorithm = "RS256" if isinstance(public, rsa.RSAPublicKey) else "ES256"
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(public))
            documents.append({**jwk, "kid": kid, "use": "sig", "alg": algorithm})
        return web.json_response({"keys": documents})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/.well-known/jwks.json"
    finally:
        await runner.cleanup()


async def test_a_key_set_verifies_tokens_by_the_kid_they_name(hub_server: Any) -> None:
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys: dict[str, Any] = {"one": signing_key.public_key()}
    async with (
        key_set_server(keys) as url,
        hub_server(auth_required=True, auth_jwks_url=url) as served,
    ):
        signed = token(key=signing_key, algorithm="RS256", kid="one")
        async with client(served.url + "?topics=test:team-a-eth&token=" + signed) as (ws, _):
            await nothing_more(ws)
        unknown = token(key=signing_key, algorithm="RS256", kid="two")
        assert (await refused(served.url + "?token=" + unknown)).status_code == 401
        assert served.hub.stats()["refused_handshakes"] == {"signature": 1}


async def test_a_key_set_follows_a_rotation_and_keeps_hmac_keys_out() -> None:
    old = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new = ec.generate_private_key(ec.SECP256R1())
    keys: dict[str, Any] = {"old": old.public_key()}
    async with key_set_server(keys) as url:
        verifier = JwksVerifier(url, refetch_interval=0)
        verify = verifier.verify
        signed = token(key=old, algorithm="RS256", kid="old")
        assert (await asyncio.to_thread(verify, signed)).identity == "alice"
        # The issuer rotates: a token naming the new kid makes the verifier fetch the set.
        keys["new"] = new.public_key()
        rotated = token(key=new, algorithm="ES256", kid="new")
        assert (await asyncio.to_thread(verify, rotated)).identity == "alice"
        with pytest.raises(TokenRefused) as refusal:
            await asyncio.to_thread(verify, token(key=new, algorithm="ES256", kid="unknown"))
        assert refusal.value.reason == "signature"


async def test_an_unreachable_key_set_refuses_with_503(hub_server: Any) -> None:
    async with key_set_server({}) as url:
        pass  # closed: nothing listens there any more
    async with hub_server(auth_required=True, auth_jwks_url=url, auth_timeout=2) as served:
        private, _ = key_pair("RS256")
        response = await refused(
            served.url + "?token=" + token(key=private, algorithm="RS256", kid="k")
        )
        assert response.status_code == 503
        assert served.hub.stats()["refused_handshakes"] == {"jwks": 1}


# Minting


async def test_a_minted_token_admits_its_client_to_its_topics(hub_server: Any) -> None:
    minted = mint_token(SECRET, sub="team-a-dashboard", topics=TEAM_A, ttl=60)
    async with hub_server(auth_required=True, auth_secret=SECRET) as served:
        async with client(served.url + "?topics=test:team-a-eth&token=" + minted) as (ws, hello):
            assert hello["data"]["topics"] == ["test:team-a-eth"]
            assert await subscribe(ws, "test:team-a-erigon") == [
                "test:team-a-erigon",
                "test:team-a-eth",
            ]
        assert wshub.mint_token is mint_token
