"""The fake's Files and Message Batches follow contract §10: per account, 404 for any other account."""

import time

import requests

from harness import key_for

FILES_BETA = "files-api-2025-04-14"


def headers(name, **extra):
    return {"x-api-key": key_for(name), "anthropic-version": "2023-06-01", "anthropic-beta": FILES_BETA, **extra}


def accounts(fake, *names):
    for name in names:
        fake.add_api_key(key_for(name), account=name)


def upload(fake, name, filename="a.txt", data=b"hello", **extra):
    r = requests.post(
        f"{fake.url}/v1/files",
        headers=headers(name, **extra),
        files={"file": (filename, data, "text/plain")},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_files_belong_to_their_account(fake):
    accounts(fake, "a", "b")
    meta = upload(fake, "a", data=b"x" * 7)
    assert meta["id"].startswith("file_") and meta["type"] == "file"
    assert (meta["filename"], meta["mime_type"], meta["size_bytes"], meta["downloadable"]) == (
        "a.txt",
        "text/plain",
        7,
        False,
    )
    url = f"{fake.url}/v1/files/{meta['id']}"
    assert requests.get(url, headers=headers("a"), timeout=10).json() == meta
    other = requests.get(url, headers=headers("b"), timeout=10)
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
    assert requests.delete(url, headers=headers("b"), timeout=10).status_code == 404
    assert (
        requests.get(url + "/content", headers=headers("a"), timeout=10).status_code == 400
    )  # uploads aren't downloadable
    assert requests.delete(url, headers=headers("a"), timeout=10).json() == {"id": meta["id"], "type": "file_deleted"}
    assert requests.get(url, headers=headers("a"), timeout=10).status_code == 404


def test_downloadable_file_content(fake):
    accounts(fake, "a")
    meta = upload(fake, "a", data=b"\x00\xffbytes", **{"x-fake-downloadable": "1"})
    r = requests.get(f"{fake.url}/v1/files/{meta['id']}/content", headers=headers("a"), timeout=10)
    assert r.status_code == 200 and r.content == b"\x00\xffbytes"


def test_file_list_is_per_account_newest_first_and_paged(fake):
    accounts(fake, "a", "b")
    ids = [upload(fake, "a", f"{i}.txt")["id"] for i in range(5)]
    upload(fake, "b")
    listed = requests.get(f"{fake.url}/v1/files", headers=headers("a"), params={"limit": 2}, timeout=10).json()
    assert [f["id"] for f in listed["data"]] == ids[::-1][:2] and listed["has_more"] is True
    assert (listed["first_id"], listed["last_id"]) == (ids[4], ids[3])
    nxt = requests.get(f"{fake.url}/v1/files", headers=headers("a"), params={"after_id": ids[3]}, timeout=10).json()
    assert [f["id"] for f in nxt["data"]] == ids[2::-1] and nxt["has_more"] is False
    bad = requests.get(f"{fake.url}/v1/files", headers=headers("a"), params={"limit": 0}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_message_naming_another_accounts_file_is_404(fake):
    accounts(fake, "a", "b")
    file_id = upload(fake, "a")["id"]
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "document", "source": {"type": "file", "file_id": file_id}},
                    {"type": "text", "text": "Sum up"},
                ],
            }
        ],
    }
    assert requests.post(f"{fake.url}/v1/messages", headers=headers("a"), json=body, timeout=10).status_code == 200
    refused = requests.post(f"{fake.url}/v1/messages", headers=headers("b"), json=body, timeout=10)
    assert refused.status_code == 404 and file_id in refused.json()["error"]["message"]


def test_batches_lifecycle_and_ownership(fake):
    accounts(fake, "a", "b")
    fake.resources.batch_seconds = 0.2
    base = f"{fake.url}/v1/messages/batches"
    body = {
        "requests": [
            {"custom_id": f"r{i}", "params": {"model": "m", "max_tokens": 5, "messages": []}} for i in range(3)
        ]
    }
    batch = requests.post(base, headers=headers("a"), json=body, timeout=10).json()
    assert batch["id"].startswith("msgbatch_") and batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
    assert requests.get(f"{base}/{batch['id']}/results", headers=headers("a"), timeout=10).status_code == 400
    assert requests.delete(f"{base}/{batch['id']}", headers=headers("a"), timeout=10).status_code == 400
    for verb, suffix in (("get", ""), ("get", "/results"), ("post", "/cancel"), ("delete", "")):
        r = requests.request(verb, f"{base}/{batch['id']}{suffix}", headers=headers("b"), timeout=10)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert [b["id"] for b in requests.get(base, headers=headers("b"), timeout=10).json()["data"]] == []
    assert [b["id"] for b in requests.get(base, headers=headers("a"), timeout=10).json()["data"]] == [batch["id"]]
    time.sleep(0.3)
    ended = requests.get(f"{base}/{batch['id']}", headers=headers("a"), timeout=10).json()
    assert ended["processing_status"] == "ended" and ended["request_counts"]["succeeded"] == 3
    lines = requests.get(f"{base}/{batch['id']}/results", headers=headers("a"), timeout=10).text.splitlines()
    assert sorted(line.split('"')[3] for line in lines) == ["r0", "r1", "r2"]
    assert (
        requests.delete(f"{base}/{batch['id']}", headers=headers("a"), timeout=10).json()["type"]
        == "message_batch_deleted"
    )


def test_cancel_ends_the_batch_canceled(fake):
    accounts(fake, "a")
    fake.resources.batch_seconds = 0.2
    base = f"{fake.url}/v1/messages/batches"
    body = {"requests": [{"custom_id": "r", "params": {"model": "m", "max_tokens": 5, "messages": []}}]}
    batch = requests.post(base, headers=headers("a"), json=body, timeout=10).json()
    assert (
        requests.post(f"{base}/{batch['id']}/cancel", headers=headers("a"), timeout=10).json()["processing_status"]
        == "canceling"
    )
    time.sleep(0.3)
    assert (
        requests.get(f"{base}/{batch['id']}", headers=headers("a"), timeout=10).json()["request_counts"]["canceled"]
        == 1
    )
