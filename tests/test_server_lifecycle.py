"""`outpost-server serve` as a long-running process.

Online re-signing without a person (short expiries), graceful shutdown on
SIGTERM and a restart on the same data_dir, the static repository's HTTP
headers, interrupted uploads, and the API's error bodies. The repository is
built with the `outpost` CLI as in test_interop.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.request
import time
from datetime import datetime, timezone

import pytest

from conftest import (
    FW_BYTES,
    FW_PATH,
    Agent,
    OutpostServer,
    TufClient,
    assert_ok,
    http_get,
    http_get_full,
    http_post,
    parse_token,
    run,
)

FW_SHA = hashlib.sha256(FW_BYTES).hexdigest()
FW_URL_PATH = f"targets/firmware/rpi4/1.0.0/{FW_SHA}.fw.img"


def parse_expires(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def served_timestamp(server: OutpostServer) -> tuple[bytes, dict]:
    status, body = server.metadata("timestamp.json")
    assert status == 200, f"GET /metadata/timestamp.json answered {status}: {body[:200]!r}"
    return body, json.loads(body)["signed"]


def push_and_publish(repo, server: OutpostServer, token: str) -> None:
    repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token)
    repo.publish(FW_BYTES, "1.0.0", server=server, token=token)


def wait_until(epoch: float, limit: float) -> None:
    """Sleep until the wall clock passes `epoch` (at most `limit` seconds)."""
    delay = epoch - time.time()
    assert delay <= limit, f"would have to wait {delay:.1f}s (> {limit}s)"
    if delay > 0:
        time.sleep(delay)


def fresh_client(tmp_path, repo, server, name: str) -> TufClient:
    client = TufClient(tmp_path / name, metadata_url=f"{server.url}/metadata/",
                       targets_url=f"{server.url}/targets/")
    assert_ok(client.init(repo.root1))
    return client


# ----------------------------------------------------------- online re-signing
def test_server_resigns_online_metadata_before_it_expires(tmp_path, outpost_repo, server_factory):
    server, token = server_factory(outpost_repo, timestamp_expiry="4s", snapshot_expiry="6s",
                                   resign_interval="1s")
    push_and_publish(outpost_repo, server, token)
    _, first = served_timestamp(server)
    v0, exp0 = first["version"], parse_expires(first["expires"])
    snap0 = first["meta"]["snapshot.json"]["version"]
    assert exp0 - time.time() <= 5, f"timestamp_expiry = 4s not honoured: {first}"

    ts_bumped = snap_bumped = False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        fetched_at = time.time()
        _, ts = served_timestamp(server)
        assert parse_expires(ts["expires"]) > fetched_at, \
            f"server served an expired timestamp at {fetched_at:.1f}: {ts}"
        ts_bumped |= ts["version"] > v0 and parse_expires(ts["expires"]) > exp0
        snap_bumped |= ts["meta"]["snapshot.json"]["version"] > snap0
        if ts_bumped and snap_bumped and time.time() > exp0 + 0.5:
            break
        time.sleep(0.2)
    assert ts_bumped, "timestamp.json was not re-signed (version and expiry moved) within 15s\n" \
        + server.log_text()[-2000:]
    assert snap_bumped, "snapshot was not re-signed within 15s\n" + server.log_text()[-2000:]
    assert time.time() > exp0, "the original timestamp has not expired yet"

    # The original timestamp is expired now; a device refreshing sees only fresh metadata.
    client = fresh_client(tmp_path, outpost_repo, server, "device")
    res = assert_ok(client.refresh())
    trusted = json.loads(client.trusted("timestamp"))["signed"]
    assert trusted["version"] > v0, res.describe()
    assert_ok(client.download(FW_PATH))
    assert client.stored_target(FW_PATH) == FW_BYTES

    status, log = http_get(f"{server.url}/api/v1/log", token=token)
    assert status == 200 and b"resign" in log, f"re-signing not in the API log: {log[:500]!r}"


def test_restarted_server_resigns_metadata_that_expired_while_it_was_down(
        tmp_path, outpost_repo, server_factory):
    server, token = server_factory(outpost_repo, timestamp_expiry="3s", snapshot_expiry="3s",
                                   resign_interval="1s")
    push_and_publish(outpost_repo, server, token)
    assert server.terminate() == 0, server.log_text()[-2000:]
    on_disk = json.loads((server.metadata_dir / "timestamp.json").read_bytes())["signed"]
    wait_until(parse_expires(on_disk["expires"]) + 0.5, limit=6)

    server.start()
    deadline = time.monotonic() + 2
    while True:
        fetched_at = time.time()
        _, ts = served_timestamp(server)
        if parse_expires(ts["expires"]) > fetched_at:
            break
        assert time.monotonic() < deadline, \
            f"2s after restart the server still serves an expired timestamp: {ts}"
        time.sleep(0.1)
    assert ts["version"] > on_disk["version"]
    client = fresh_client(tmp_path, outpost_repo, server, "device")
    assert_ok(client.refresh())


# ---------------------------------------------------- shutdown and restart
def test_sigterm_stops_gracefully_and_restart_serves_the_same_repository(tmp_path, published):
    repo, server, _ = published
    ts_before = served_timestamp(server)[0]
    status, fw_before = http_get(f"{server.url}/{FW_URL_PATH}")
    assert (status, fw_before) == (200, FW_BYTES)

    start = time.monotonic()
    code = server.terminate(timeout=10)
    assert code == 0, f"outpost-server exit code after SIGTERM: {code} " \
        f"(after {time.monotonic() - start:.1f}s)\n{server.log_text()[-2000:]}"
    log = server.log_text().lower()
    assert "shutdown" in log or "shutting down" in log, \
        "nothing about the shutdown in the log\n" + log[-2000:]

    server.start()
    assert served_timestamp(server)[0] == ts_before, "timestamp.json changed across a restart"
    assert http_get(f"{server.url}/{FW_URL_PATH}") == (200, FW_BYTES)
    agent = Agent(tmp_path / "device", server.url, repo.root1)
    res = assert_ok(agent.update())
    assert Agent.report(res).get("target") == FW_PATH
    assert agent.stored(FW_PATH) == FW_BYTES


@pytest.mark.parametrize("client", ["idle-keepalive", "stalled-upload"])
def test_sigterm_with_an_open_client_connection_still_exits_promptly(published, client):
    """Neither an idle keep-alive connection nor a client that stops sending
    mid-upload may keep the server from shutting down (a service manager would
    otherwise SIGKILL it, mid-write)."""
    _, server, token = published
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        if client == "idle-keepalive":
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n"
                         .encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            sock.sendall(_upload_head(server, token, 10_000_000) + b"x" * 65536)
        time.sleep(0.3)
        start = time.monotonic()
        code = server.terminate(timeout=10)
        elapsed = time.monotonic() - start
        assert code == 0, f"exit code {code} after {elapsed:.1f}s with a {client} connection " \
            f"open (None = still running after 10s)\n{server.log_text()[-2000:]}"
    finally:
        sock.close()
    assert not any(server.staging_dir.glob("*.part")), list(server.staging_dir.iterdir())


@pytest.mark.parametrize("interval", ["0s", "60s"], ids=["zero", "longer-than-expiry"])
def test_resign_interval_that_cannot_keep_metadata_fresh_is_refused_or_handled(
        tmp_path, outpost_repo, interval):
    """With timestamp_expiry = 3s, a resign_interval of 0s (no period at all) or
    60s (checks far apart) must either be refused at startup, naming the setting,
    or the server must still never serve an expired timestamp."""
    settings = {"timestamp_expiry": "3s", "snapshot_expiry": "3s", "resign_interval": interval}
    server = OutpostServer(tmp_path, outpost_repo, repository=settings)
    res = run([server.exe, "--config", server.config, "token", "create", "--role", "pipeline",
               "--name", "ci"])
    if res.returncode != 0:
        assert "resign_interval" in res.stderr, res.describe()
        return
    token = parse_token(res.stdout)
    try:
        if not server.start(allow_exit=True):
            assert server.proc.returncode != 0 and "resign_interval" in server.log_text(), \
                server.log_text()[-2000:]
            return
        outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url,
                         "--token", token)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            fetched_at = time.time()
            _, ts = served_timestamp(server)
            assert parse_expires(ts["expires"]) > fetched_at, (
                f"resign_interval = {interval!r} was accepted, and the server now serves an "
                f"expired timestamp: {ts}\n{server.log_text()[-1500:]}")
            time.sleep(0.25)
        assert "panicked" not in server.log_text(), server.log_text()[-3000:]
    finally:
        server.stop()


# --------------------------------------------------------------- HTTP surface
def test_healthz_content_types_and_cache_headers(published):
    _, server, _ = published
    status, headers, body = http_get_full(f"{server.url}/healthz")
    assert status == 200
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert json.loads(body) == {"status": "ok"}

    _, ts = served_timestamp(server)
    snap_v = ts["meta"]["snapshot.json"]["version"]
    status, _, snap = http_get_full(f"{server.url}/metadata/{snap_v}.snapshot.json")
    assert status == 200
    meta = json.loads(snap)["signed"]["meta"]
    versioned = ["1.root.json", f"{snap_v}.snapshot.json",
                 f"{meta['targets.json']['version']}.targets.json",
                 f"{meta['firmware.json']['version']}.firmware.json"]

    status, headers, _ = http_get_full(f"{server.url}/metadata/timestamp.json")
    assert status == 200
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert "no-cache" in headers.get("cache-control", ""), headers
    for name in versioned:
        status, headers, _ = http_get_full(f"{server.url}/metadata/{name}")
        assert status == 200, name
        assert headers.get("content-type", "").startswith("application/json"), (name, headers)
        assert "immutable" in headers.get("cache-control", ""), (name, headers)
    status, headers, _ = http_get_full(f"{server.url}/metadata/root.json")
    assert status == 200
    assert "immutable" not in headers.get("cache-control", ""), \
        f"root.json changes on rotation but is served immutable: {headers}"

    status, headers, body = http_get_full(f"{server.url}/{FW_URL_PATH}")
    assert (status, body) == (200, FW_BYTES)
    assert headers.get("content-type") == "application/octet-stream", headers
    assert "immutable" in headers.get("cache-control", ""), headers
    status, headers, body = http_get_full(f"{server.url}/{FW_URL_PATH}",
                                          headers={"Range": "bytes=0-9"})
    assert (status, body) == (206, FW_BYTES[:10])
    assert headers.get("content-type") == "application/octet-stream", headers

    assert http_get(f"{server.url}/metadata/99.snapshot.json")[0] == 404
    assert http_get(f"{server.url}/targets/firmware/rpi4/9.9.9/nothing.img")[0] == 404


def _raw_get(server: OutpostServer, target: str) -> int:
    """Status of a GET whose request target is sent exactly as given (no client-side
    normalisation of dot segments)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def test_targets_ranges_conditionals_head_and_paths(published):
    """Resumed downloads (single ranges), caches (Last-Modified), HEAD, and requests
    that try to leave the targets directory."""
    _, server, _ = published
    url = f"{server.url}/{FW_URL_PATH}"
    size = len(FW_BYTES)
    status, headers, body = http_get_full(url, headers={"Range": f"bytes={size - 10}-"})
    assert (status, body) == (206, FW_BYTES[-10:])
    assert headers.get("content-range") == f"bytes {size - 10}-{size - 1}/{size}", headers
    assert headers.get("accept-ranges") == "bytes", headers
    status, _, body = http_get_full(url, headers={"Range": "bytes=-5"})
    assert (status, body) == (206, FW_BYTES[-5:])
    status, _, body = http_get_full(url, headers={"Range": f"bytes=3-{size * 2}"})
    assert (status, body) == (206, FW_BYTES[3:])
    status, headers, _ = http_get_full(url, headers={"Range": f"bytes={size}-"})
    assert status == 416 and headers.get("content-range") == f"bytes */{size}", headers
    # Several ranges, another unit, or a malformed value: the whole file (RFC 9110 allows it).
    for value in ("bytes=0-1,4-5", "items=0-1", "bytes=x-y"):
        status, _, body = http_get_full(url, headers={"Range": value})
        assert (status, body) == (200, FW_BYTES), value

    status, headers, _ = http_get_full(url)
    last_modified = headers.get("last-modified")
    assert last_modified, headers
    assert http_get_full(url, headers={"If-Modified-Since": last_modified})[0] == 304
    assert http_get_full(url, headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})[0] == 200
    assert http_get_full(url, headers={"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})[0] == 412

    req = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200 and r.read() == b""
        assert r.headers.get("Content-Length") == str(size), dict(r.headers)

    # Metadata sits beside the targets directory: reachable only under /metadata.
    beside = server.data_dir / "repository" / "metadata" / "timestamp.json"
    assert beside.is_file(), f"expected the served metadata at {beside}"
    assert _raw_get(server, "/metadata/timestamp.json") == 200
    for target in ("/targets/../metadata/timestamp.json", "/targets/%2e%2e/metadata/timestamp.json",
                   "/targets/firmware/../../metadata/timestamp.json", "/targets//etc/passwd",
                   "/targets/firmware/rpi4/1.0.0/"):
        assert _raw_get(server, target) == 404, target


def _threads(pid: int) -> int:
    status = open(f"/proc/{pid}/status", encoding="ascii").read()
    return int(status.split("Threads:", 1)[1].split()[0])


def test_stalled_downloads_hold_no_server_threads(published):
    """Devices that stop reading in the middle of a download must not each pin a
    server thread: the blocking pool is shared with the rest of the server and capped
    (512), so a fleet of slow devices would starve it. Idle blocking-pool threads exit
    after 10 s; a thread waiting on a stalled client would not."""
    _, server, _ = published
    size = 32 << 20
    big = server.data_dir / "repository" / "targets" / "stall" / "big.img"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(os.urandom(size))
    pid = server.proc.pid
    before = _threads(pid)
    stalled = 40
    socks = []
    try:
        for _ in range(stalled):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            sock.sendall(b"GET /targets/stall/big.img HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(sock)
        for sock in socks:
            assert sock.recv(64).startswith(b"HTTP/1.1 200"), "a stalled download did not start"
        deadline = time.time() + 25
        while time.time() < deadline and _threads(pid) >= before + stalled // 2:
            time.sleep(0.5)
        threads = _threads(pid)
        assert threads < before + stalled // 2, \
            f"{threads} server threads with {stalled} stalled downloads ({before} before them)"
        # Everything else still works, downloads included.
        assert http_get(f"{server.url}/healthz")[0] == 200
        status, body = http_get(f"{server.url}/targets/stall/big.img", timeout=60)
        assert status == 200 and len(body) == size
    finally:
        for sock in socks:
            sock.close()


# ------------------------------------------------------------------ uploads
def _upload_head(server: OutpostServer, token: str, length: int) -> bytes:
    return (f"POST /api/v1/targets?path=firmware/rpi4/2.0.0/fw.img HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("ending", ["close", "half-close"])
def test_truncated_upload_leaves_nothing_in_staging(published, ending):
    _, server, token = published
    staging = server.staging_dir
    assert staging.is_dir(), f"no staging dir at {staging}"
    before = sorted(p.name for p in staging.iterdir())
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(_upload_head(server, token, 10_000_000) + b"\xab" * (2 << 20))
    time.sleep(0.3)
    if ending == "half-close":
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        try:
            sock.recv(4096)
        except OSError:
            pass
    sock.close()

    deadline = time.monotonic() + 5
    while sorted(p.name for p in staging.iterdir()) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(p.name for p in staging.iterdir())
    assert left == before, f"interrupted upload left {set(left) - set(before)} in {staging}"

    # The server keeps serving, and a complete upload still works.
    assert http_get(f"{server.url}/healthz")[0] == 200
    assert served_timestamp(server)
    data = b"complete upload" * 100
    status, body = http_post(f"{server.url}/api/v1/targets?path=firmware/rpi4/2.0.0/fw.img",
                             data, token, "application/octet-stream")
    assert status == 200, body[:300]
    answer = json.loads(body)
    assert answer == {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
    assert not any(p.name.endswith(".part") for p in staging.iterdir())


# ---------------------------------------------------------------- API errors
@pytest.mark.parametrize("case", ["not-json", "unknown-field", "not-an-object"])
def test_publish_with_malformed_body_answers_json_error(published, case):
    _, server, token = published
    body, words = {
        "not-json": (b"this is not json {", ("json", "parse", "expected")),
        "unknown-field": (json.dumps({"roles": {}, "bogus_field": 1}).encode(), ("bogus_field",)),
        "not-an-object": (b"[1, 2, 3]", ("map", "object", "struct", "sequence", "array")),
    }[case]
    ts_before = served_timestamp(server)[0]
    status, answer = http_post(f"{server.url}/api/v1/publish", body, token, "application/json")
    assert 400 <= status < 500, f"answered {status}: {answer[:300]!r}"
    try:
        doc = json.loads(answer)
    except ValueError:
        pytest.fail(f"error body is not JSON: {answer[:300]!r}", pytrace=False)
    assert isinstance(doc, dict) and set(doc) >= {"code", "message"}, doc
    assert isinstance(doc["code"], str) and doc["code"], doc
    assert isinstance(doc["message"], str), doc
    assert any(w in doc["message"].lower() for w in words), \
        f"message does not name the problem ({words}): {doc}"
    assert served_timestamp(server)[0] == ts_before


def test_publish_with_wrong_content_type_answers_json_error(published):
    _, server, token = published
    status, answer = http_post(f"{server.url}/api/v1/publish", b"{}", token, "text/plain")
    assert 400 <= status < 500, f"answered {status}: {answer[:300]!r}"
    doc = json.loads(answer)
    assert {"code", "message"} <= set(doc), doc
    assert "content-type" in doc["message"].lower() or "json" in doc["message"].lower(), doc


def test_upload_over_max_upload_bytes_is_refused_and_not_kept(outpost_repo, server_factory):
    server, token = server_factory(outpost_repo, max_upload_bytes=4096)
    status, body = http_post(f"{server.url}/api/v1/targets?path=firmware/rpi4/1.0.0/fw.img",
                             b"\x01" * 20000, token, "application/octet-stream")
    assert status == 413, f"answered {status}: {body[:300]!r}"
    doc = json.loads(body)
    assert {"code", "message"} <= set(doc) and "4096" in doc["message"], doc
    assert list(server.staging_dir.iterdir()) == []
    status, body = http_post(f"{server.url}/api/v1/targets?path=firmware/rpi4/1.0.0/fw.img",
                             b"\x01" * 4096, token, "application/octet-stream")
    assert status == 200, body[:300]
