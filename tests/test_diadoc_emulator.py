"""The Diadoc emulator over real HTTP: tokens, paging by IndexKey, late events, faults."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bridge.diadoc.emulator import DiadocEmulator, DiadocEmulatorServer
from bridge.diadoc.ticks import timestamp


@pytest.fixture
def diadoc() -> Iterator[DiadocEmulatorServer]:
    with DiadocEmulatorServer(DiadocEmulator(("box-a", "box-b"))) as server:
        yield server


def _token(client: httpx.Client, server: DiadocEmulatorServer, refresh: str) -> dict[str, Any]:
    answer = client.post(
        server.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "client_id": server.model.client_id,
            "client_secret": server.model.client_secret,
        },
    )
    body: dict[str, Any] = answer.json()
    body["status"] = answer.status_code
    return body


def _events(
    client: httpx.Client, server: DiadocEmulatorServer, token: str, **body: Any
) -> httpx.Response:
    request = {"Filter": {"FromTimestamp": {"Ticks": 0}, "ToTimestamp": timestamp(4e9)}, **body}
    return client.post(
        f"{server.api_url}/V4/GetDocflowEvents",
        params={"boxId": body.pop("box", "box-a")},
        json=request,
        headers={"Authorization": f"Bearer {token}"},
    )


def test_refresh_tokens_rotate(diadoc: DiadocEmulatorServer) -> None:
    with httpx.Client() as client:
        info = client.get(f"{diadoc.api_url}/_emulator/app").json()
        assert info["boxes"] == ["box-a", "box-b"]
        first = _token(client, diadoc, info["refresh_token"])
        assert first["status"] == 200
        assert first["refresh_token"] != info["refresh_token"]
        reused = _token(client, diadoc, info["refresh_token"])
        assert (reused["status"], reused["error"]) == (400, "invalid_grant")
        assert _token(client, diadoc, first["refresh_token"])["status"] == 200


def test_paging_follows_index_keys_and_late_events_sort_behind(
    diadoc: DiadocEmulatorServer,
) -> None:
    with httpx.Client() as client:
        control = f"{diadoc.api_url}/_emulator"
        client.post(f"{control}/events", json={"box": "box-a", "count": 3, "documents": 2})
        token = _token(client, diadoc, diadoc.model.issue_refresh_token())["access_token"]
        first = _events(client, diadoc, token, Limit=4).json()
        assert first["TotalCount"] == 6
        assert len(first["Events"]) == 4
        # one change of a message with two documents: one EventId, two entities
        assert first["Events"][0]["EventId"] == first["Events"][1]["EventId"]
        assert first["Events"][0]["DocumentId"] != first["Events"][1]["DocumentId"]
        after = first["Events"][-1]["IndexKey"]
        second = _events(client, diadoc, token, Limit=4, AfterIndexKey=after).json()
        assert len(second["Events"]) == 2
        cursor = second["Events"][-1]["IndexKey"]
        client.post(f"{control}/late", json={"box": "box-a", "age_s": 600})
        assert _events(client, diadoc, token, AfterIndexKey=cursor).json()["Events"] == []
        everything = _events(client, diadoc, token).json()["Events"]
        assert len(everything) == 7
        assert everything[0]["Timestamp"]["Ticks"] < first["Events"][0]["Timestamp"]["Ticks"]


def test_documents_populated_on_request(diadoc: DiadocEmulatorServer) -> None:
    diadoc.model.add_events("box-a", document_type="Invoice")
    with httpx.Client() as client:
        token = _token(client, diadoc, diadoc.model.issue_refresh_token())["access_token"]
        bare = _events(client, diadoc, token).json()["Events"][0]
        full = _events(client, diadoc, token, PopulateDocuments=True).json()["Events"][0]
    assert "Document" not in bare
    assert full["Document"]["DocumentInfo"]["TypeNamedId"] == "Invoice"


def test_errors_carry_the_diadoc_error_code(diadoc: DiadocEmulatorServer) -> None:
    with httpx.Client() as client:
        assert _events(client, diadoc, "nope").status_code == 401
        token = _token(client, diadoc, diadoc.model.issue_refresh_token())["access_token"]
        forbidden = _events(client, diadoc, token, box="box-z")
        assert forbidden.status_code == 403
        assert forbidden.headers["X-Diadoc-ErrorCode"] == "Http.Forbidden"
        bad = _events(client, diadoc, token, AfterIndexKey="not a key")
        assert bad.status_code == 400
        assert _events(client, diadoc, token, Limit=101).status_code == 400


def test_injected_faults_and_token_expiry(diadoc: DiadocEmulatorServer) -> None:
    with httpx.Client() as client:
        token = _token(client, diadoc, diadoc.model.issue_refresh_token())["access_token"]
        client.post(
            f"{diadoc.api_url}/_emulator/faults",
            json={
                "rules": [
                    {"status": 429, "count": 2, "after": 1, "retry_after": 0},
                    {"expire_tokens": True, "after": 1},
                ]
            },
        )
        statuses = [_events(client, diadoc, token).status_code for _ in range(5)]
        assert statuses == [200, 429, 429, 200, 401]
        counters = client.get(f"{diadoc.api_url}/_emulator/counters").json()
        assert counters["statuses"] == {"200": 2, "401": 1, "429": 2}
        client.post(f"{diadoc.api_url}/_emulator/reset")
        assert client.get(f"{diadoc.api_url}/_emulator/counters").json()["requests"] == 0


def test_duplicate_delivers_the_same_event_again(diadoc: DiadocEmulatorServer) -> None:
    with httpx.Client() as client:
        added = client.post(
            f"{diadoc.api_url}/_emulator/events", json={"box": "box-b", "count": 2}
        ).json()["added"]
        again = client.post(
            f"{diadoc.api_url}/_emulator/duplicate", json={"box": "box-b", "key": added[0]["key"]}
        ).json()["added"][0]
        listed = client.get(f"{diadoc.api_url}/_emulator/events", params={"box": "box-b"}).json()
    assert again["key"] == added[0]["key"]
    assert again["IndexKey"] != added[0]["IndexKey"]
    assert [e["key"] for e in listed["events"]][-1] == added[0]["key"]
