"""Transports: each module serves hub clients over one server library, through the session
port (:mod:`wshub.session`) and nothing else.

- :mod:`~wshub.transports.lean`: websockets' sans-I/O protocol under a bare asyncio protocol,
  no task per connection; :func:`wshub.serve`.
- :mod:`~wshub.transports.websockets`: websockets' asyncio server; ``hub.handler`` and
  :func:`wshub.server_options`.
- :mod:`~wshub.transports.aiohttp`: a route of an aiohttp application;
  :func:`wshub.aiohttp_handler`.
- :mod:`~wshub.transports.asgi`: an ASGI application (Starlette, FastAPI, uvicorn);
  :func:`wshub.asgi_app`.
"""

from .aiohttp import aiohttp_events_handler, aiohttp_handler
from .asgi import AsgiApp, asgi_app
from .lean import serve, start_server
from .websockets import server_options

__all__ = [
    "AsgiApp",
    "aiohttp_events_handler",
    "aiohttp_handler",
    "asgi_app",
    "serve",
    "server_options",
    "start_server",
]
