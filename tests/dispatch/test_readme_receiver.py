"""The README's five-line receiver, run as written against WebhookSender: it accepts what we
sign with its secret and refuses anything else."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from service.auth.signing import new_signing_secret
from service.common.clock import ManualClock
from service.dispatch.delivery import Delivery, DeliverySettings, OutcomeKind, WebhookSender
from tests.conftest import REPO_ROOT


def readme_receiver(secret: str) -> Callable[[web.Request], Any]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Webhook delivery") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    assert len([line for line in code.group(1).splitlines() if line.strip()]) == 5
    namespace: dict[str, Any] = {"web": web, "SECRET": secret}
    exec(code.group(1), namespace)
    handler: Callable[[web.Request], Any] = namespace["setpoint"]
    return handler


async def test_the_readme_receiver_verifies_our_signatures() -> None:
    secret = new_signing_secret()
    app = web.Application()
    app.router.add_post("/hook", readme_receiver(secret))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        async with WebhookSender(
            DeliverySettings(allow_private_networks=True), ManualClock(datetime.now(UTC))
        ) as sender:
            signed = Delivery("msg_1", url, b'{"power_kw": "1.5"}', (secret,))
            assert (await sender.send(signed)).kind is OutcomeKind.ACCEPTED
            rotated = Delivery("msg_2", url, b"{}", (new_signing_secret(), secret))
            assert (await sender.send(rotated)).kind is OutcomeKind.ACCEPTED
            forged = Delivery("msg_3", url, b"{}", (new_signing_secret(),))
            outcome = await sender.send(forged)
            assert outcome.kind is not OutcomeKind.ACCEPTED
            assert outcome.http_status == 500  # the snippet lets the verification error raise
    finally:
        await runner.cleanup()
