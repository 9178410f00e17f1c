"""Who a client is and what it may subscribe to: subscriber tokens and topic grants.

A subscriber token is a JWT, verified with PyJWT: HS256 with a shared secret, or RS256/ES256
with the issuer's public key. Its claims:

- ``exp`` (required): when it stops being valid.
- ``sub``: the client's identity, for ``client_info()`` and the logs.
- ``topics``: the topic patterns the client may subscribe to: exact topics, and prefixes
  ending in ``*`` (``test:eth_*``, ``run:*``); ``*`` alone grants every topic, and is the only
  grant that allows a subscription to ``*`` itself.
- ``aud`` / ``iss``: checked when the verifier is given an audience or issuer.

Browsers cannot set headers on a WebSocket handshake, so :func:`token_from` looks in the
``?token=`` query parameter first, then in ``Authorization: Bearer``, then in the
``wshub_token`` cookie. A token is a credential: nothing here logs it, and a
:class:`TokenRefused` says why a token was refused without repeating it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.cookies
import inspect
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .logs import RateLimitedLog
from .session import HandshakeRequest
from .wire import topic_problem

if TYPE_CHECKING:  # the config module imports this one, for the key rules
    from .config import HubConfig

__all__ = [
    "ANONYMOUS",
    "ASYMMETRIC_ALGORITHMS",
    "TOKEN_COOKIE",
    "TOKEN_QUERY",
    "AuthUnavailable",
    "AuthenticateHook",
    "Authenticator",
    "Grants",
    "JwksVerifier",
    "Principal",
    "TokenRefused",
    "TokenVerifier",
    "mint_token",
    "parse_duration",
    "token_from",
]

TOKEN_QUERY: Final = "token"
TOKEN_COOKIE: Final = "wshub_token"
HMAC_ALGORITHM: Final = "HS256"
ASYMMETRIC_ALGORITHMS: Final = ("RS256", "ES256")
# An HS256 secret shorter than this can be guessed offline from any token signed with it.
MIN_SECRET_BYTES: Final = 32
MAX_TOPIC_GRANTS: Final = 1000
WILDCARD: Final = "*"
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# A missing aud or iss is refused for the same reason as a wrong one.
_MISSING_CLAIM_REASONS: Final = {"aud": "audience", "iss": "issuer"}


class TokenRefused(Exception):
    """A client that may not connect: its token (or an ``authenticate`` hook) refused it.

    A hook raises it to refuse a client with HTTP 401; ``message`` is the answer's body.

    Attributes:
        reason: One word, for counting refusals: ``missing``, ``malformed``, ``signature``,
            ``expired``, ``audience``, ``issuer`` or ``claims`` for tokens; a hook's own
            word (lower-case letters and ``_``, at most 32) or ``refused``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class AuthUnavailable(TokenRefused):
    """Authentication could not decide: the hook failed or took longer than
    ``auth_timeout``, or the key set cannot be fetched. The client is refused with 503."""


@dataclasses.dataclass(frozen=True, slots=True)
class Grants:
    """The topic patterns a client may subscribe to.

    Attributes:
        patterns: Exact topics, prefixes ending in ``*``, or ``*`` for every topic.
    """

    patterns: tuple[str, ...]

    @classmethod
    def everything(cls) -> Grants:
        return cls((WILDCARD,))

    @classmethod
    def of(cls, patterns: Iterable[str]) -> Grants:
        """Grants of ``patterns``, each checked as a topic is (1 to 256 characters).

        Raises:
            ValueError: A pattern is not a valid topic, or has ``*`` anywhere but at its end.
        """
        checked: list[str] = []
        for pattern in patterns:
            problem = topic_problem(pattern)
            if problem is not None:
                raise ValueError(f"topic pattern {str(pattern)[:64]!r}: {problem}")
            if WILDCARD in pattern[:-1]:
                raise ValueError(f"topic pattern {pattern[:64]!r}: '*' may only end a pattern")
            checked.append(pattern)
        return cls(tuple(dict.fromkeys(checked)))

    def allows(self, topic: str) -> bool:
        """Whether a client holding these grants may subscribe to ``topic``."""
        if topic == WILDCARD:
            return WILDCARD in self.patterns
        for pattern in self.patterns:
            if pattern == topic:
                return True
            if pattern.endswith(WILDCARD) and topic.startswith(pattern[:-1]):
                return True
        return False

    def forbidden(self, topics: Iterable[str]) -> list[str]:
        """The ``topics`` these grants do not allow, in their order."""
        return [topic for topic in topics if not self.allows(topic)]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who a client is, as its admission found.

    Attributes:
        identity: The token's ``sub`` (or the hook's answer); None when anonymous.
        grants: What it may subscribe to.
        expires_at: When its token expires (Unix seconds); None for no expiry.
    """

    identity: str | None
    grants: Grants
    expires_at: float | None = None


@dataclasses.dataclass(frozen=True)
class TokenVerifier:
    """Verifies subscriber tokens with one key.

    Args:
        secret: The HS256 secret (at least 32 bytes); or
        public_key: A PEM public key for RS256 or ES256 (the algorithm follows the key).
        audience: When given, a token's ``aud`` must name it.
        issuer: When given, a token's ``iss`` must be it.
        leeway: Seconds of clock difference tolerated on ``exp``.

    Raises:
        ValueError: Neither or both keys, a short secret, or a key PyJWT cannot load.
    """

    secret: str | None = None
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 0.0
    # The one algorithm a token must be signed with: HS256 with a secret, else the key's.
    algorithm: str = dataclasses.field(init=False, default=HMAC_ALGORITHM)

    def __post_init__(self) -> None:
        if (self.secret is None) == (self.public_key is None):
            raise ValueError("give a token verifier exactly one of secret and public_key")
        if self.secret is not None:
            check_secret("an HS256 secret", self.secret)
        algorithm = HMAC_ALGORITHM if self.public_key is None else algorithm_of(self.public_key)
        object.__setattr__(self, "algorithm", algorithm)

    def verify(self, token: str) -> Principal:
        """The principal a token names.

        Raises:
            TokenRefused: Its signature, expiry, audience, issuer or claims are wrong.
        """
        key: Any = self.secret if self.secret is not None else self.public_key
        return _decode(token, key, self.algorithm, self.audience, self.issuer, self.leeway)


class JwksVerifier:
    """Verifies subscriber tokens with the keys of a JSON Web Key Set, found by ``kid``.

    PyJWT's :class:`jwt.PyJWKClient` fetches the set and keeps it for ``lifespan`` seconds;
    a token naming a ``kid`` the cached set lacks fetches it again, at most once per
    ``refetch_interval``, so an issuer can rotate keys and a client cannot make the hub
    hammer the issuer with made-up key ids. :meth:`verify` may fetch over the network:
    call it in a thread.

    Args:
        url: The key set's URL.
        audience, issuer, leeway: As for :class:`TokenVerifier`.
        timeout: Seconds one fetch may take.
        lifespan: Seconds a fetched set is kept.
        refetch_interval: Seconds after a fetch before an unknown ``kid`` fetches again.
    """

    def __init__(
        self,
        url: str,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        timeout: float = 5.0,
        lifespan: float = 300.0,
        refetch_interval: float = 30.0,
    ) -> None:
        self.url = url
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._client = jwt.PyJWKClient(
            url,
            cache_keys=True,
            lifespan=lifespan,
            timeout=timeout,
            cooldown_duration=refetch_interval,
        )

    def verify(self, token: str) -> Principal:
        """The principal a token names (blocking while the key set is fetched).

        Raises:
            AuthUnavailable: The key set cannot be fetched.
            TokenRefused: No key of the set signed it, or its claims are wrong.
        """
        try:
            signing_key = self._client.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError:
            raise AuthUnavailable("jwks", "the key set cannot be fetched") from None
        except jwt.PyJWKClientError:
            raise TokenRefused("signature", "no key of the key set signed this token") from None
        except jwt.DecodeError:
            raise TokenRefused("malformed", "the token is not a well-formed JWT") from None
        algorithm = signing_key.algorithm_name
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            # An HMAC key published in a key set would be a secret anyone can read.
            raise TokenRefused("signature", f"the key set's key is for {algorithm}")
        return _decode(token, signing_key.key, algorithm, self.audience, self.issuer, self.leeway)


def _decode(
    token: str,
    key: Any,
    algorithm: str,
    audience: str | None,
    issuer: str | None,
    leeway: float,
) -> Principal:
    """Verify ``token`` with ``key`` and the one ``algorithm`` it must use."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": ["exp"], "verify_aud": audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise TokenRefused("expired", "the token has expired") from None
    except jwt.InvalidAudienceError:
        raise TokenRefused("audience", "the token is not for this hub (aud)") from None
    except jwt.MissingRequiredClaimError as exc:
        reason = _MISSING_CLAIM_REASONS.get(exc.claim, "claims")
        raise TokenRefused(reason, f"the token has no {exc.claim!r} claim") from None
    except jwt.InvalidIssuerError:
        raise TokenRefused("issuer", "the token is from another issuer (iss)") from None
    except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
        raise TokenRefused("signature", "the token's signature does not verify") from None
    except jwt.DecodeError:
        raise TokenRefused("malformed", "the token is not a well-formed JWT") from None
    except jwt.InvalidTokenError as exc:
        raise TokenRefused("claims", f"the token's claims are invalid: {exc}") from None
    return principal_of(claims)


def principal_of(claims: Mapping[str, Any]) -> Principal:
    """The principal of a verified token's claims.

    Raises:
        TokenRefused: ``sub`` is not a string, or ``topics`` not a list of valid patterns.
    """
    identity = claims.get("sub")
    if identity is not None and not isinstance(identity, str):
        raise TokenRefused("claims", "the token's sub claim must be a string")
    topics = claims.get("topics", [])
    if not isinstance(topics, list) or len(topics) > MAX_TOPIC_GRANTS:
        raise TokenRefused(
            "claims", f"the token's topics claim must be a list of at most {MAX_TOPIC_GRANTS}"
        )
    try:
        grants = Grants.of(topics)
    except ValueError as exc:
        raise TokenRefused("claims", f"the token's topics claim: {exc}") from None
    return Principal(identity, grants, float(claims["exp"]))


def token_from(request: HandshakeRequest) -> str | None:
    """The token a handshake carries: ``?token=``, ``Authorization: Bearer``, or the
    ``wshub_token`` cookie, in that order; None when it carries none."""
    values = request.query.get(TOKEN_QUERY)
    if values and values[0]:
        return values[0]
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    cookie = request.headers.get("cookie")
    if cookie:
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(cookie)
        except http.cookies.CookieError:
            return None
        if TOKEN_COOKIE in jar and jar[TOKEN_COOKIE].value:
            return jar[TOKEN_COOKIE].value
    return None


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``90``, ``30s``, ``15m``, ``1h`` or ``7d``.

    Raises:
        ValueError: Not such a duration, or not more than zero.
    """
    found = _DURATION.match(text)
    if found is None or float(found.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m, 1h or 7d")
    return float(found.group(1)) * _UNIT_SECONDS[found.group(2)]


def mint_token(
    key: str,
    *,
    sub: str | None,
    topics: Sequence[str],
    ttl: float,
    algorithm: str = HMAC_ALGORITHM,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """A subscriber token for ``sub``, allowed ``topics``, valid for ``ttl`` seconds.

    Args:
        key: The HS256 secret, or the PEM private key for RS256 / ES256.
        sub: The client's identity.
        topics: The topic patterns it may subscribe to (see :class:`Grants`).
        ttl: Seconds from ``now`` until it expires.
        algorithm: ``HS256``, ``RS256`` or ``ES256``.
        audience: Its ``aud``, if the hub checks one.
        issuer: Its ``iss``, if the hub checks one.
        now: The issue time (Unix seconds); the current time when None.

    Raises:
        ValueError: A bad pattern, a ttl not above zero, a short secret, an unknown algorithm.
    """
    if algorithm not in (HMAC_ALGORITHM, *ASYMMETRIC_ALGORITHMS):
        known = ", ".join((HMAC_ALGORITHM, *ASYMMETRIC_ALGORITHMS))
        raise ValueError(f"algorithm must be one of {known}, got {algorithm!r}")
    if algorithm == HMAC_ALGORITHM:
        check_secret("an HS256 secret", key)
    if not ttl > 0:
        raise ValueError(f"ttl must be more than zero seconds, got {ttl!r}")
    grants = Grants.of(topics)
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iat": int(issued),
        "exp": int(issued + ttl),
        "jti": uuid.uuid4().hex,
        "topics": list(grants.patterns),
    }
    optional = {"sub": sub, "aud": audience, "iss": issuer}
    claims.update({name: value for name, value in optional.items() if value is not None})
    try:
        return jwt.encode(claims, key, algorithm=algorithm)
    except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
        raise ValueError(f"cannot sign with this key and {algorithm}: {exc}") from None


def check_secret(name: str, secret: str) -> None:
    """The one rule for HS256 secrets: at least :data:`MIN_SECRET_BYTES` bytes.

    Raises:
        ValueError: ``secret`` is shorter; the message starts with ``name``.
    """
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{name} must be at least {MIN_SECRET_BYTES} bytes (a shorter HS256 secret can be "
            f"guessed from any token signed with it)"
        )


def algorithm_of(pem: str) -> str:
    """RS256 for an RSA public key, ES256 for an EC one: the key decides, so that a token
    cannot choose another algorithm for it.

    Raises:
        ValueError: Not a PEM public key of either kind.
    """
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"
    raise ValueError(f"a {type(key).__name__} cannot verify RS256 or ES256 tokens")


AuthenticateHook = Callable[[HandshakeRequest], "Principal | Awaitable[Principal | None] | None"]
"""``Hub(authenticate=...)``: who the client of a handshake is (sync or async).

Return a :class:`Principal` to admit it as that principal, None when the request carries no
credentials the hook knows (a token, if any, is then verified, and ``auth_required``
decides about a client with neither), or raise :class:`TokenRefused` to refuse it (401). Any
other exception, or taking longer than ``auth_timeout``, refuses it with 503 and is logged.
"""

ANONYMOUS: Final = Principal(None, Grants.everything())
"""A client nothing authenticated, on a hub that does not require it: it may subscribe to
every topic, as before tokens existed."""

# A JWT this long is no subscriber token: refused before it is parsed.
MAX_TOKEN_LENGTH: Final = 8192
_REASON: Final = re.compile(r"^[a-z_]{1,32}$")
# Refusal reasons are metric labels: a hook's own words are kept to a few.
MAX_REASONS: Final = 32


class Authenticator:
    """How a hub learns who a client is, once per connection, and counts whom it refused.

    Args:
        config: The hub's settings (``auth_*``).
        hook: The ``authenticate`` hook, if any.
        log: Where a failing hook is reported (lines that clients cause, rate-limited).

    Raises:
        ValueError: ``auth_required`` is set, and neither a key nor a hook can authenticate.
    """

    def __init__(
        self, config: HubConfig, hook: AuthenticateHook | None, log: RateLimitedLog
    ) -> None:
        self._hook = hook
        self._log = log
        self._timeout = config.auth_timeout
        self.required = config.auth_required
        self._static: TokenVerifier | None = None
        self._jwks: JwksVerifier | None = None
        if config.auth_jwks_url is not None:
            self._jwks = JwksVerifier(
                config.auth_jwks_url,
                audience=config.auth_audience,
                issuer=config.auth_issuer,
                leeway=config.auth_leeway,
                timeout=config.auth_timeout,
            )
        elif config.auth_secret is not None or config.auth_public_key is not None:
            self._static = TokenVerifier(
                secret=config.auth_secret,
                public_key=config.auth_public_key,
                audience=config.auth_audience,
                issuer=config.auth_issuer,
                leeway=config.auth_leeway,
            )
        if self.required and hook is None and not self.verifies_tokens:
            raise ValueError(
                "auth_required is true, but nothing can authenticate clients: set auth_secret, "
                "auth_public_key or auth_jwks_url, or pass Hub(authenticate=...)"
            )
        self.refused: dict[str, int] = {}

    @property
    def verifies_tokens(self) -> bool:
        """Whether a key (a secret, a public key, a key set) verifies tokens here."""
        return self._static is not None or self._jwks is not None

    @property
    def waits(self) -> bool:
        """Whether deciding may wait (for a hook, or a key set over the network); when not,
        :meth:`authenticate_now` decides at once, without a task per handshake."""
        return self._hook is not None or self._jwks is not None

    async def authenticate(self, request: HandshakeRequest) -> Principal:
        """Who the client of ``request`` is: the hook's answer, else its token's principal,
        else :data:`ANONYMOUS` when authentication is not required.

        Raises:
            TokenRefused: It may not connect (``AuthUnavailable``: nothing could decide).
        """
        try:
            if self._hook is not None:
                principal = await self._ask_hook(request)
                if principal is not None:
                    return principal
            token = token_from(request)
            if token is not None and self.verifies_tokens:
                return await self.verify(token)
            return self._without_token()
        except TokenRefused as refused:
            self._count(refused)
            raise

    def authenticate_now(self, request: HandshakeRequest) -> Principal:
        """:meth:`authenticate`, where it never waits (:attr:`waits` is false).

        Raises:
            TokenRefused: It may not connect.
        """
        assert not self.waits
        try:
            if self._static is None:  # no key: a token would not count, so none is read
                return self._without_token()
            token = token_from(request)
            if token is not None:
                return self._verify_static(self._static, token)
            return self._without_token()
        except TokenRefused as refused:
            self._count(refused)
            raise

    def _without_token(self) -> Principal:
        if self.required:
            raise TokenRefused("missing", "a subscriber token is required")
        return ANONYMOUS

    @staticmethod
    def _verify_static(verifier: TokenVerifier, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRefused("malformed", f"the token is longer than {MAX_TOKEN_LENGTH}")
        return verifier.verify(token)

    async def verify(self, token: str) -> Principal:
        """The principal of ``token`` (a handshake's, or a ``refresh``'s).

        Raises:
            TokenRefused: The token is refused, or this hub verifies no tokens.
        """
        if self._static is not None:
            return self._verify_static(self._static, token)
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRefused("malformed", f"the token is longer than {MAX_TOKEN_LENGTH}")
        if self._jwks is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    return await asyncio.to_thread(self._jwks.verify, token)
            except TimeoutError:
                raise AuthUnavailable("jwks", "the key set took too long to fetch") from None
        raise TokenRefused("unsupported", "this hub verifies no tokens")

    async def _ask_hook(self, request: HandshakeRequest) -> Principal | None:
        assert self._hook is not None
        try:
            async with asyncio.timeout(self._timeout):
                answer = self._hook(request)
                if inspect.isawaitable(answer):
                    answer = await answer
        except TokenRefused as refused:
            if not _REASON.match(refused.reason):
                refused.reason = "refused"
            raise
        except TimeoutError:
            self._log.warning(
                "authenticate took longer than auth_timeout (%gs): client refused", self._timeout
            )
            raise AuthUnavailable("hook_timeout", "authentication is unavailable") from None
        except Exception:
            # The hook's bug, not the client's: its traceback helps (rate-limited all the same).
            self._log.exception("authenticate failed: client refused")
            raise AuthUnavailable("hook_error", "authentication is unavailable") from None
        if answer is not None and not isinstance(answer, Principal):
            self._log.warning(
                "authenticate returned a %s, not a Principal or None: client refused",
                type(answer).__name__,
            )
            raise AuthUnavailable("hook_error", "authentication is unavailable")
        return answer

    def _count(self, refused: TokenRefused) -> None:
        reason = refused.reason
        if reason not in self.refused and len(self.refused) >= MAX_REASONS:
            reason = "other"
        self.refused[reason] = self.refused.get(reason, 0) + 1
