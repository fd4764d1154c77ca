"""wss:// with a test CA: agents connect when the certificate verifies and refuse otherwise."""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme

from artcafe_trio import AuthenticationError, open_agent, open_hub
from artcafe_trio.testing import TestHub

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_agent_connects_over_wss_when_the_certificate_verifies(ca: trustme.CA) -> None:
    async with open_hub(port=0, ssl_context=server_context(ca)) as hub:
        assert hub.url is not None
        assert hub.url.startswith("wss://")
        key = TestHub(hub).register("acme", "a1")
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        with trio.fail_after(10):
            async with open_agent(
                url=hub.url, organization_id="acme", agent_id="a1", private_key=key,
                ssl_context=client_context,
            ) as agent:  # fmt: skip
                got = trio.Event()
                await agent.subscribe("x", lambda s, d: got.set())
                await agent.publish("x", 1, confirm=True)
                await got.wait()


async def test_agent_refuses_a_hub_whose_certificate_does_not_verify(ca: trustme.CA) -> None:
    async with open_hub(port=0, ssl_context=server_context(ca)) as hub:
        assert hub.url is not None
        key = TestHub(hub).register("acme", "a1")
        start = trio.current_time()
        with pytest.raises(AuthenticationError) as info:  # the system trust store lacks our CA
            async with open_agent(
                url=hub.url, organization_id="acme", agent_id="a1", private_key=key
            ):
                pytest.fail("must not connect")
        assert info.value.code == "hub_certificate_invalid"
        assert "certificate" in str(info.value)
        assert trio.current_time() - start < 2.0  # at once, not after a connect timeout
        assert hub.stats.auth_failures == 0
