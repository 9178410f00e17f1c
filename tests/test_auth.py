"""Subscriber tokens and topic grants, without sockets: wshub/auth.py."""

from __future__ import annotations

import time

import jwt
import pytest

from wshub.auth import (
    Grants,
    TokenRefused,
    TokenVerifier,
    mint_token,
    parse_duration,
    token_from,
)
from wshub.session import HandshakeRequest

from .helpers import SECRET, key_pair


def refusal(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenRefused) as refused:
        verifier.verify(token)
    assert token not in str(refused.value)  # a refusal never repeats the credential
    return refused.value.reason


def test_a_minted_token_names_its_client_its_topics_and_its_expiry() -> None:
    token = mint_token(SECRET, sub="alice", topics=["test:eth_*", "run:*"], ttl=3600, now=1e9)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert (claims["iat"], claims["exp"]) == (1_000_000_000, 1_000_003_600)
    fresh = mint_token(SECRET, sub="alice", topics=["test:eth_*", "run:*"], ttl=3600)
    principal = TokenVerifier(secret=SECRET).verify(fresh)
    assert principal.identity == "alice"
    assert principal.grants.patterns == ("test:eth_*", "run:*")
    assert principal.expires_at is not None
    assert time.time() < principal.expires_at <= time.time() + 3600


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_tokens_verify_with_the_public_key_only(algorithm: str) -> None:
    private, public = key_pair(algorithm)
    token = mint_token(private, sub="bob", topics=["*"], ttl=60, algorithm=algorithm)
    verifier = TokenVerifier(public_key=public)
    assert verifier.algorithm == algorithm
    assert verifier.verify(token).grants == Grants.everything()
    # Another key pair's token does not verify.
    other, _ = key_pair(algorithm)
    forged = mint_token(other, sub="bob", topics=["*"], ttl=60, algorithm=algorithm)
    assert refusal(verifier, forged) == "signature"


def test_the_key_decides_the_algorithm_so_a_token_cannot() -> None:
    _, rsa_public = key_pair("RS256")
    ec_private, _ = key_pair("ES256")
    rsa_verifier = TokenVerifier(public_key=rsa_public)
    es_token = mint_token(ec_private, sub="x", topics=["*"], ttl=60, algorithm="ES256")
    assert refusal(rsa_verifier, es_token) == "signature"
    # The classic confusion: HS256 "signed" with the public key as its secret.
    confused = _hs256_with_key_bytes(rsa_public)
    assert refusal(rsa_verifier, confused) == "signature"
    unsigned = jwt.encode({"exp": int(time.time()) + 60}, "", algorithm="none")
    assert refusal(TokenVerifier(secret=SECRET), unsigned) == "signature"


def _hs256_with_key_bytes(key: str) -> str:
    """An HS256 token whose secret is ``key``'s text, built by hand: PyJWT refuses to sign
    with a PEM as an HMAC secret, which is the attack this token stands for."""
    import base64
    import hashlib
    import hmac
    import json

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = part(json.dumps({"exp": int(time.time()) + 60, "topics": ["*"]}).encode())
    signature = hmac.new(key.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{part(signature)}"


def test_refusals_say_why() -> None:
    verifier = TokenVerifier(secret=SECRET)
    expired = mint_token(SECRET, sub="a", topics=["*"], ttl=60, now=time.time() - 3600)
    assert refusal(verifier, expired) == "expired"
    other = mint_token("another-secret-of-thirty-two-bytes!!", sub="a", topics=["*"], ttl=60)
    assert refusal(verifier, other) == "signature"
    assert refusal(verifier, "not.a.jwt") == "malformed"
    assert refusal(verifier, "nonsense") == "malformed"
    no_exp = jwt.encode({"sub": "a", "topics": ["*"]}, SECRET, algorithm="HS256")
    assert refusal(verifier, no_exp) == "claims"
    for topics in ("*", [1], ["a*b"], [""], ["x" * 257]):
        bad = jwt.encode(
            {"exp": int(time.time()) + 60, "topics": topics}, SECRET, algorithm="HS256"
        )
        assert refusal(verifier, bad) == "claims", topics
    bad_sub = jwt.encode({"exp": int(time.time()) + 60, "sub": 7}, SECRET, algorithm="HS256")
    assert refusal(verifier, bad_sub) == "claims"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="wshub", issuer="https://auth.example")

    def token(**claims: str) -> str:
        return mint_token(SECRET, sub="a", topics=["*"], ttl=60, **claims)  # type: ignore[arg-type]

    assert verifier.verify(token(audience="wshub", issuer="https://auth.example")).identity == "a"
    assert refusal(verifier, token(issuer="https://auth.example")) == "audience"
    assert refusal(verifier, token(audience="other", issuer="https://auth.example")) == "audience"
    assert refusal(verifier, token(audience="wshub")) == "issuer"
    assert refusal(verifier, token(audience="wshub", issuer="https://evil.example")) == "issuer"
    # Without an audience configured, a token's aud does not matter.
    assert TokenVerifier(secret=SECRET).verify(token(audience="any")).identity == "a"


def test_grants_match_exact_topics_and_prefixes_and_only_star_allows_star() -> None:
    grants = Grants.of(["test:eth_*", "run:42"])
    assert grants.allows("test:eth_call")
    assert grants.allows("test:eth_")
    assert not grants.allows("test:debug_traceTransaction")
    assert grants.allows("run:42")
    assert not grants.allows("run:420")
    assert not grants.allows("*")
    assert grants.forbidden(["run:42", "run:7", "test:eth_call", "*"]) == ["run:7", "*"]
    everything = Grants.everything()
    assert everything.allows("*") and everything.allows("anything")
    assert not Grants.of([]).allows("run:42")
    assert not Grants.of(["run:*"]).allows("*")
    with pytest.raises(ValueError, match="may only end a pattern"):
        Grants.of(["a*b"])
    with pytest.raises(ValueError, match="topic pattern"):
        Grants.of([""])


def request(target: str = "/api/ws", **headers: str) -> HandshakeRequest:
    return HandshakeRequest.from_target(target, headers, "127.0.0.1:5000")


def test_the_token_comes_from_the_query_a_bearer_header_or_the_cookie() -> None:
    assert token_from(request()) is None
    assert token_from(request("/api/ws?token=q")) == "q"
    assert token_from(request(authorization="Bearer b")) == "b"
    assert token_from(request(authorization="bearer  b ")) == "b"
    assert token_from(request(authorization="Basic b")) is None
    assert token_from(request(cookie="theme=dark; wshub_token=c")) == "c"
    assert token_from(request(cookie="wshub_token=")) is None
    assert token_from(request(cookie='bad"cookie')) is None
    both = request("/api/ws?token=q", authorization="Bearer b", cookie="wshub_token=c")
    assert token_from(both) == "q"
    assert token_from(request(authorization="Bearer b", cookie="wshub_token=c")) == "b"


def test_durations() -> None:
    assert [parse_duration(text) for text in ("90", "30s", "15m", "1h", "7d", "1.5h")] == [
        90,
        30,
        900,
        3600,
        604800,
        5400,
    ]
    for bad in ("", "0", "-1h", "1w", "h", "1 hour"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration(bad)


def test_bad_keys_and_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier(secret="short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        mint_token("short", sub="a", topics=["*"], ttl=60)
    with pytest.raises(ValueError, match="exactly one of"):
        TokenVerifier()
    with pytest.raises(ValueError, match="exactly one of"):
        TokenVerifier(secret=SECRET, public_key="x")
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----")
    private, _ = key_pair("RS256")
    with pytest.raises(ValueError, match="not a PEM public key"):
        TokenVerifier(public_key=private)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        mint_token(SECRET, sub="a", topics=["*"], ttl=60, algorithm="HS512")
    with pytest.raises(ValueError, match="ttl must be more than zero"):
        mint_token(SECRET, sub="a", topics=["*"], ttl=0)
    with pytest.raises(ValueError, match="cannot sign"):
        mint_token(SECRET, sub="a", topics=["*"], ttl=60, algorithm="RS256")
