"""``python -m wshub.bench``: broadcast throughput of wshub against the servers users would
otherwise pick, over real sockets, with the clients in other processes.

``python -m wshub.bench --help`` lists the workloads and options; the README has the results.
"""

from .cli import main

__all__ = ["main"]
