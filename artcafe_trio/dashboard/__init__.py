"""The hub's live dashboard (page, JSON API, server-sent events) and alert webhooks.

Run it beside a hub with :func:`serve_dashboard` (``artcafe-trio hub --dashboard``);
see ``docs/dashboard.md`` and ``docs/alerts.md``.
"""

from __future__ import annotations

from ._app import Dashboard, DashboardConfig, serve_dashboard, static_files
from ._http import HttpLimits
from ._tokens import Access, create_token
from ._webhooks import AlertFilter, Webhook, WebhookConfig, WebhookStats, sign

__all__ = [
    "Access",
    "AlertFilter",
    "Dashboard",
    "DashboardConfig",
    "HttpLimits",
    "Webhook",
    "WebhookConfig",
    "WebhookStats",
    "create_token",
    "serve_dashboard",
    "sign",
    "static_files",
]
