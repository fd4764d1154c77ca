"""Free TCP ports for servers a test starts itself, safe across parallel test processes.

Binding port 0, reading the port and closing the socket leaves a window in which any
other process (another pytest-xdist worker, another test session) may be handed the same
port by its own ``bind(("127.0.0.1", 0))``. Instead each port is *reserved*: it is bound,
a connection is accepted on it and closed from the server side first, which leaves that
side in TIME_WAIT for a minute. While it lasts the kernel hands the port to no
``bind(..., 0)`` and uses it as no connection's source port, yet a server that sets
``SO_REUSEADDR`` (trio's listeners, ``http.server``, nats-server, the fault proxy) can bind
it at once. Nothing listens on a reserved port, so a connection to it is refused.
"""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and no ``bind(0)`` will be handed."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((HOST, 0))
        server.listen(1)
        port: int = server.getsockname()[1]
        with socket.create_connection((HOST, port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server side closes first: its end waits in TIME_WAIT
            client.recv(1)  # wait for the FIN, then close our end
    return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct reserved ports (see :func:`free_port`)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
