"""The reference hub: WebSocket server, sessions, routing, presence and registry.

Import the public names from :mod:`artcafe_trio`; this subpackage is the implementation.
"""

from __future__ import annotations

from ._hub import CloseCode, Hub, HubConfig
from ._serve import open_hub, serve_hub

__all__ = ["CloseCode", "Hub", "HubConfig", "open_hub", "serve_hub"]
