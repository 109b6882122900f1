"""The Diadoc emulator over real HTTP: tokens, paging by IndexKey (ties included), late events,
the V5 document shape, protobuf unless JSON is asked for, versions, departments, faults."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bridge.diadoc.ticks import timestamp
from bridge.emulators.diadoc import DiadocEmulator, DiadocEmulatorServer


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
    client: httpx.Client,
    server: DiadocEmulatorServer,
    token: str,
    *,
    version: str = "V5",
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    box = body.pop("box", "box-a")
    request = {"Filter": {"FromTimestamp": {"Ticks": 0}, "ToTimestamp": timestamp(4e9)}, **body}
    return client.post(
        f"{server.api_url}/{version}/GetDocflowEvents",
        params={"boxId": box},
        json=request,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            **(headers or {}),
        },
    )


def _access(client: httpx.Client, server: DiadocEmulatorServer) -> str:
    token: str = _token(client, server, server.model.issue_refresh_token())["access_token"]
    return token


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


# The required fields of DocumentInfoV5 and DocumentWithDocflowV5, from Kontur's own proto files
# (diadoc/diadocsdk-csharp: proto/Docflow/DocumentInfoV5.proto, DocumentWithDocflowV5.proto).
DOCUMENT_INFO_V5_REQUIRED = {
    "FullVersion",
    "MessageType",
    "WorkflowId",
    "Participants",
    "DocumentDirection",
    "DepartmentId",
    "DocumentLinks",
    "PacketInfo",
    "IsRead",
    "IsDeleted",
    "IsInvitation",
}
DOCUMENT_WITH_DOCFLOW_V5_REQUIRED = {"DocumentId", "LastEvent", "DocumentInfo", "Docflow"}


def test_documents_populated_on_request_in_the_v5_shape(diadoc: DiadocEmulatorServer) -> None:
    diadoc.model.add_events("box-a", document_type="Invoice")
    with httpx.Client() as client:
        token = _access(client, diadoc)
        bare = _events(client, diadoc, token).json()["Events"][0]
        full = _events(client, diadoc, token, PopulateDocuments=True).json()["Events"][0]
        v3 = _events(client, diadoc, token, version="V3", PopulateDocuments=True).json()
    assert "Document" not in bare
    document = full["Document"]
    assert set(document) >= DOCUMENT_WITH_DOCFLOW_V5_REQUIRED
    info = document["DocumentInfo"]
    assert set(info) >= DOCUMENT_INFO_V5_REQUIRED
    assert "TypeNamedId" not in info  # the type is in FullVersion only
    assert info["FullVersion"] == {"TypeNamedId": "Invoice", "Function": "default", "Version": "v1"}
    assert [p["IsCurrentBox"] for p in info["Participants"]["Participants"]] == [False, True]
    # V3 and V4 carry DocumentInfoV3: the same FullVersion, the older participants.
    old = v3["Events"][0]["Document"]["DocumentInfo"]
    assert old["FullVersion"]["TypeNamedId"] == "Invoice"
    assert old["Participants"]["Recipient"]["BoxId"] == "box-a"


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of a protobuf message: enough to read an answer."""
    out: list[tuple[int, int | bytes]] = []
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        tag = varint()
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            out.append((field, varint()))
        elif wire == 1:
            out.append((field, data[i : i + 8]))
            i += 8
        else:
            size = varint()
            out.append((field, data[i : i + size]))
            i += size
    return out


def test_without_accept_json_the_answer_is_protobuf(diadoc: DiadocEmulatorServer) -> None:
    (event,) = diadoc.model.add_events("box-a")
    with httpx.Client() as client:
        token = _access(client, diadoc)
        answer = _events(client, diadoc, token, headers={"Accept": "*/*"})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/x-protobuf"
    with pytest.raises(UnicodeDecodeError):  # not JSON: not even text
        answer.json()
    # GetDocflowEventsResponseV5: TotalCount = 1, Events = 2, TotalCountType = 3
    top = dict(_fields(answer.content))
    assert top[1] == 1
    assert top[3] == 1
    events = top[2]
    assert isinstance(events, bytes)
    inner = dict(_fields(events))
    assert inner[1] == event.event_id.encode()  # DocflowEventV5.EventId
    assert inner[4] == base64.b64decode(event.index_key)  # IndexKey as bytes


def test_a_body_that_is_not_json_is_415(diadoc: DiadocEmulatorServer) -> None:
    with httpx.Client() as client:
        token = _access(client, diadoc)
        answer = client.post(
            f"{diadoc.api_url}/V5/GetDocflowEvents",
            params={"boxId": "box-a"},
            content=b"\x0a\x00",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "Content-Type": "application/x-protobuf",
            },
        )
    assert answer.status_code == 415


def test_versions_served_and_the_sunset_of_old_ones(diadoc: DiadocEmulatorServer) -> None:
    with httpx.Client() as client:
        token = _access(client, diadoc)
        v3 = _events(client, diadoc, token, version="V3")
        v5 = _events(client, diadoc, token)
        v9 = _events(client, diadoc, token, version="V9")
        client.post(
            f"{diadoc.api_url}/_emulator/faults", json={"deprecation": {"5": "@1800000000"}}
        )
        later = _events(client, diadoc, token)
    assert v3.status_code == 200
    assert v3.headers["Sunset"] == "Sat, 03 Apr 2027 00:00:00 GMT"
    assert 'rel="sunset"' in v3.headers["Link"]
    assert "Sunset" not in v5.headers
    assert v9.status_code == 404
    assert v9.headers["X-Diadoc-ErrorCode"] == "Http.NotFound"
    assert later.headers["Deprecation"] == "@1800000000"


def test_tied_index_keys_are_skipped_by_after_index_key(diadoc: DiadocEmulatorServer) -> None:
    """The real feed's tie (diadoc/diadocsdk-csharp issue 1083): events of one change share one
    IndexKey and Timestamp, and AfterIndexKey set to that key skips all of them."""
    before = diadoc.model.add_events("box-a", count=3)
    tie = diadoc.model.add_events("box-a", count=4, tied=True)
    diadoc.model.add_events("box-a", count=2)
    assert len({e.index_key for e in tie}) == 1
    assert len({e.event_id for e in tie}) == 4
    with httpx.Client() as client:
        token = _access(client, diadoc)
        first = _events(client, diadoc, token, Limit=5).json()["Events"]
        cut = first[-1]["IndexKey"]
        second = _events(client, diadoc, token, Limit=5, AfterIndexKey=cut).json()["Events"]
        before_tie = first[2]["IndexKey"]
        again = _events(client, diadoc, token, Limit=5, AfterIndexKey=before_tie).json()["Events"]
    assert cut == tie[0].index_key
    assert [e["EventId"] for e in first[:3]] == [e.event_id for e in before]
    assert len(second) == 2  # the two tied events beyond the first page are gone
    assert [e["EventId"] for e in again[:4]] == [e.event_id for e in tie]


def test_a_department_limited_account(diadoc: DiadocEmulatorServer) -> None:
    diadoc.model.add_box("box-d", department="dep-1")
    mine = diadoc.model.add_events("box-d", department="dep-1")
    diadoc.model.add_events("box-d", department="dep-2")
    with httpx.Client() as client:
        token = _access(client, diadoc)
        whole = _events(client, diadoc, token, box="box-d")
        other = _events(client, diadoc, token, box="box-d", DepartmentId="dep-2")
        own = _events(client, diadoc, token, box="box-d", DepartmentId="dep-1")
    assert whole.status_code == 403
    assert other.status_code == 403
    assert [e["EventId"] for e in own.json()["Events"]] == [mine[0].event_id]


@pytest.mark.parametrize("defect", ["no_event_id", "bad_timestamp", "no_index_key"])
def test_malformed_events_are_served_as_asked(diadoc: DiadocEmulatorServer, defect: str) -> None:
    with httpx.Client() as client:
        added = client.post(
            f"{diadoc.api_url}/_emulator/events", json={"box": "box-a", "defect": defect}
        ).json()["added"]
        token = _access(client, diadoc)
        (event,) = _events(client, diadoc, token).json()["Events"]
    assert added[0]["defect"] == defect
    field = {"no_event_id": "EventId", "bad_timestamp": "Timestamp", "no_index_key": "IndexKey"}
    assert event.get(field[defect]) in (None, "yesterday")


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
