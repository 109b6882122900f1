"""Bitrix24's own Python SDK (``b24pysdk``, PyPI) against the emulator: a client nobody here wrote.

What the SDK's source (1.3) says, and how this test reaches the emulator with it:

- ``credentials/oauth_event_data.py``: ``OAuthEventData.from_dict`` needs ``event``,
  ``event_handler_id``, ``ts`` and ``auth`` (``member_id``, ``client_endpoint``,
  ``server_endpoint``, ``domain``, ``application_token``); a block with ``access_token`` also
  needs ``expires`` and ``expires_in`` (``credentials/oauth_token.py``).
- ``api/callers/call_method.py`` builds ``https://{domain}/rest/{method}.json`` and
  ``api/requesters/bitrix_oauth_requester.py`` keeps ``https://oauth.bitrix24.tech`` in a
  ``Final`` constant: neither the scheme nor the OAuth host can be configured.
- Every call goes through ``requests.get``/``requests.post``, which honour ``HTTPS_PROXY`` and
  ``REQUESTS_CA_BUNDLE``. That is the override used: the emulator serves HTTPS under the names
  the SDK asks for (``--tls-cert``), a loopback proxy joins every connection to it, and the
  SDK's code and settings stay as shipped.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
from b24pysdk import BitrixApp, BitrixToken, Client
from b24pysdk.credentials.oauth_event_data import OAuthEventData

from bridge.emulators.bitrix24 import EmulatorConfig, EmulatorServer
from tests.plugins.emulator import EmulatorFactory, NotificationSink, PortalClient
from tests.plugins.tunnel import TunnelProxy, make_certificates

PORTAL_HOST = "acme.bitrix24.test"
SDK_OAUTH_HOST = "oauth.bitrix24.tech"  # the SDK's own constant
LEAD = "ONCRMLEADADD"


def test_the_sdk_reads_every_notification_the_emulator_sends(
    emulator_factory: EmulatorFactory,
    portal_client_factory: Callable[[EmulatorServer], PortalClient],
    notification_sink: NotificationSink,
) -> None:
    server = emulator_factory(handler_url=notification_sink.url, auto_bind=True, min_timeout=0)
    client = portal_client_factory(server)
    client.add({"event": LEAD, "user_id": 3})  # ONOFFLINEEVENT with that user's tokens
    client.control("notify")  # ONOFFLINEEVENT caused by no user
    client.control("install")
    notification_sink.wait_for(3)
    app = client.app()
    client.control("uninstall")  # last: it revokes every token
    seen = []
    for notice in notification_sink.wait_for(4):
        # What a web framework hands a handler: the flat form fields.
        payload = dict(parse_qsl(notice.body.decode(), keep_blank_values=True))
        parsed = OAuthEventData.from_dict(payload)
        seen.append((parsed.event, parsed.is_system))
        assert parsed.event_handler_id == int(notice.form["event_handler_id"]) > 0
        assert parsed.auth.member_id == app["member_id"]
        assert parsed.auth.application_token == app["application_token"]
        assert parsed.auth.client_endpoint == app["client_endpoint"]
        assert parsed.data == (notice.form.get("data") or None)
        if not parsed.is_system:
            assert parsed.auth.oauth_token is not None
            assert parsed.auth.oauth_token.expires_in == 3600
            assert parsed.auth.user_id in (1, 3)
    assert sorted(seen) == [
        ("ONAPPINSTALL", False),
        ("ONAPPUNINSTALL", True),
        ("ONOFFLINEEVENT", False),
        ("ONOFFLINEEVENT", True),
    ]


@dataclass
class HttpsPortal:
    server: EmulatorServer
    proxy: TunnelProxy
    control: httpx.Client

    def add(self, *ids: str) -> None:
        events = [{"event": LEAD, "data": {"FIELDS": {"ID": i}}} for i in ids]
        self.control.post("/_emulator/events", json={"events": events}).raise_for_status()

    def queue(self) -> dict[str, object]:
        answer: dict[str, object] = self.control.get("/_emulator/queue").json()
        return answer


@pytest.fixture
def https_portal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpsPortal]:
    certs = make_certificates(tmp_path, [PORTAL_HOST, SDK_OAUTH_HOST])
    config = EmulatorConfig(
        public_host=PORTAL_HOST,
        oauth_domain=SDK_OAUTH_HOST,
        tls_certfile=str(certs.certificate),
        tls_keyfile=str(certs.key),
        rate_limit=None,
        auto_bind=True,
    )
    server = EmulatorServer(config).start()
    proxy = TunnelProxy(server.port).start()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.authority))
    for name in ("NO_PROXY", "no_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    trust = ssl.create_default_context(cafile=str(certs.authority))
    control = httpx.Client(
        base_url=f"https://127.0.0.1:{server.port}", verify=trust, trust_env=False
    )
    try:
        yield HttpsPortal(server, proxy, control)
    finally:
        control.close()
        proxy.stop()
        server.stop()


def test_the_sdk_client_works_against_the_emulator(https_portal: HttpsPortal) -> None:
    app_info = https_portal.control.get("/_emulator/app").json()
    assert app_info["client_endpoint"] == f"https://{PORTAL_HOST}:{https_portal.server.port}/rest/"
    app = BitrixApp(client_id=app_info["client_id"], client_secret=app_info["client_secret"])
    token = BitrixToken(
        domain=https_portal.server.domain,
        auth_token="none-yet",
        refresh_token=app_info["refresh_token"],
        bitrix_app=app,
    )
    token.refresh_and_set_oauth_token()  # OAuth refresh at the SDK's own OAuth host
    assert token.refresh_token != app_info["refresh_token"]  # rotated
    client = Client(token)
    https_portal.add("1", "2", "3", "4")

    reserved = client.event.offline.get(clear=False, limit=2).result
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in reserved["events"]] == ["1", "2"]
    listed = client.event.offline.list().result
    assert [row["PROCESS_ID"] for row in listed] == [reserved["process_id"]] * 2 + ["", ""]
    first = reserved["events"][0]["MESSAGE_ID"]
    assert client.event.offline.clear(reserved["process_id"], message_id=[first]).result is True
    assert https_portal.queue()["reserved"] == {reserved["process_id"]: 1}

    # A batch whose second command refers to the first one's result, encoded by the SDK.
    batch = client.call_batch(
        {
            "get": client.event.offline.get(clear=False, limit=2),
            "clear": client.event.offline.clear("$result[get][process_id]"),
        }
    ).result
    assert [e["EVENT_DATA"]["FIELDS"]["ID"] for e in batch.result["get"]["events"]] == ["3", "4"]
    assert batch.result["clear"] is True
    assert https_portal.queue() == {"free": 0, "reserved": {reserved["process_id"]: 1}, "errors": 0}

    # An expired access token: the SDK refreshes it by itself and repeats the call.
    https_portal.control.post("/_emulator/faults", json={"expire_tokens": True})
    before = token.refresh_token
    assert len(client.event.offline.list().result) == 1
    assert token.refresh_token != before
    asked = set(https_portal.proxy.asked)
    assert asked == {f"{SDK_OAUTH_HOST}:443", https_portal.server.domain}
