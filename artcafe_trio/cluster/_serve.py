"""Running a hub in a cluster: :func:`serve_cluster_hub` and :func:`open_cluster_hub`.

The same as :func:`~artcafe_trio.serve_hub`/:func:`~artcafe_trio.open_hub`, with the
:class:`NatsBackplane` of ``cluster`` behind the hub's backplane seam (the hub package
does not know the cluster: it sits below it).
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .._util import collapse_exception_groups
from ..hub._config import HubConfig
from ..hub._hub import Hub
from ..hub._serve import _serve_hub
from ..registry._registry import Registry
from ._backplane import NatsBackplane
from ._config import ClusterConfig

__all__ = ["open_cluster_hub", "serve_cluster_hub"]


async def serve_cluster_hub(
    *,
    cluster: ClusterConfig,
    registry: Registry | None = None,
    db: str | os.PathLike[str] | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    config: HubConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    admin_file: str | os.PathLike[str] | None = None,
    task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a hub of the cluster ``cluster`` until cancelled (the other arguments as
    :func:`~artcafe_trio.serve_hub`). ``config.hub_id`` must be unique in the cluster
    (and stable across restarts); ``config.disconnect_grace`` is also the grace a
    lost hub's agents get before they are marked ``hub_lost``.

    Cancelling it shuts down gracefully: the hub drains (its lease says so), agents
    are closed with 1012 and reconnect to the other hubs with no presence change,
    the lease is deleted; alone, the hub marks its agents offline itself (see
    "Graceful stop" in ``docs/cluster.md``)."""
    config = config or HubConfig()
    backplane = NatsBackplane(cluster, hub_id=config.hub_id, grace=config.disconnect_grace)
    serve = functools.partial(
        _serve_hub, registry=registry, db=db, host=host, port=port, config=config,
        ssl_context=ssl_context, tls_cert=tls_cert, tls_key=tls_key,
        admin_file=admin_file, backplane=backplane,
    )  # fmt: skip
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            hub: Hub = await nursery.start(serve)
            if hub.url is not None:
                backplane.advertise(hub.url)  # the lease's URL (unless advertise_url)
            task_status.started(hub)


@asynccontextmanager
async def open_cluster_hub(
    *,
    cluster: ClusterConfig,
    registry: Registry | None = None,
    db: str | os.PathLike[str] | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    config: HubConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    admin_file: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Hub]:
    """Run a hub of ``cluster`` for the duration of the block (as :func:`serve_cluster_hub`)."""
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                serve_cluster_hub, cluster=cluster, registry=registry, db=db, host=host,
                port=port, config=config, ssl_context=ssl_context, tls_cert=tls_cert,
                tls_key=tls_key, admin_file=admin_file,
            )  # fmt: skip
            hub: Hub = await nursery.start(serve)
            try:
                yield hub
            finally:
                nursery.cancel_scope.cancel()
