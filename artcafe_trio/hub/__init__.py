"""The reference hub: WebSocket server, sessions, routing, presence and registry.

Import the public names from :mod:`artcafe_trio`; this subpackage is the implementation
(components: ``_sessions``, ``_router``, ``_presence``, ``_persist``, ``_backplane``,
composed in ``_serve``; ``_hub`` holds the facade and the per-connection side).
"""

from __future__ import annotations

from ._hub import CloseCode, Hub, HubConfig
from ._serve import open_hub, serve_hub

__all__ = ["CloseCode", "Hub", "HubConfig", "open_hub", "serve_hub"]

# Their public home, in reprs, docs and pickles (``artcafe_trio`` resolves them lazily).
Hub.__module__ = "artcafe_trio"
HubConfig.__module__ = "artcafe_trio"
open_hub.__module__ = "artcafe_trio"
serve_hub.__module__ = "artcafe_trio"
