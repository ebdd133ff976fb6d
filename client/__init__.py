"""agentctl: the thin client of agentd. Importing it never imports mlx.

`from agentctl import Client` works; the client module is loaded on first use so that
`import agentctl` (e.g. for the service commands) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentctl.client import AgentdError, ChatStream, Client, ClientError, ConnectionLost, DaemonNotRunning

__all__ = ["AgentdError", "ChatStream", "Client", "ClientError", "ConnectionLost", "DaemonNotRunning"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from agentctl import client

        return getattr(client, name)
    raise AttributeError(f"module 'agentctl' has no attribute {name!r}")
