"""A TUF repository simulator for the Outpost test suite.

`RepoSim` builds and signs a TUF repository in memory with python-tuf's
Metadata API (keys are generated when a test runs, nothing is stored on disk)
and `SimServer` serves it over HTTP on 127.0.0.1 with an ephemeral port.

The server records every request path, in order, and can be told to misbehave
for a given path: serve other bytes, answer with a status code, stall after the
headers, trickle the body a byte at a time, or send an endless body.

Paths used throughout this module are *logical* paths relative to the server
root, unquoted: ``metadata/2.root.json``, ``metadata/1.my role.json``,
``targets/dir/<sha256>.name``.  Requests are looked up by URL-unquoting the
path part of the request line, so a client that does not quote a ``?`` or
``#`` in a name gets a 404, as it would from a real server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

TOP_LEVEL_ROLES = ("root", "timestamp", "snapshot", "targets")


def expires_in(**delta: float) -> datetime:
    """An expiry relative to now, in whole seconds (TUF rejects fractions)."""
    return (datetime.now(timezone.utc) + timedelta(**delta)).replace(microsecond=0)


KEY_GENERATORS = {
    "ed25519": CryptoSigner.generate_ed25519,
    "ecdsa-sha2-nistp256": CryptoSigner.generate_ecdsa,
    "rsassa-pss-sha256": CryptoSigner.generate_rsa,
    "rsa-pkcs1v15-sha256": lambda: CryptoSigner.generate_rsa(scheme="rsa-pkcs1v15-sha256"),
}


def new_signer(scheme: str = "ed25519") -> CryptoSigner:
    return KEY_GENERATORS[scheme]()


def quote_all(text: str) -> str:
    """URL-quote with no safe characters (how role names and stored target
    file names are encoded by the client contract)."""
    return quote(text, safe="")


def path_hash_prefix(target_path: str, length: int = 2) -> str:
    return hashlib.sha256(target_path.encode()).hexdigest()[:length]


def firmware_custom(version: str, hardware_class: str, measurement: str | None = None,
                    data: bytes | None = None) -> dict:
    """A target's `custom` object as `outpost release publish` signs it:
    {"outpost": {"kind": "firmware", "version", "hardware_class", "expected_measurement"}}.
    The measurement defaults to the sha256 of `data`."""
    if measurement is None:
        assert data is not None, "give the measurement or the data"
        measurement = hashlib.sha256(data).hexdigest()
    return {"outpost": {"kind": "firmware", "version": version, "hardware_class": hardware_class,
                        "expected_measurement": {"sha256": measurement}}}


def _dedupe(signers: list[Signer]) -> list[Signer]:
    seen: set[str] = set()
    out = []
    for s in signers:
        if s.public_key.keyid not in seen:
            seen.add(s.public_key.keyid)
            out.append(s)
    return out


@dataclasses.dataclass
class Misbehaviour:
    """What the server does for one path instead of serving its file."""

    kind: str  # "bytes" | "status" | "stall" | "trickle" | "endless"
    data: bytes = b""
    status: int = 200
    seconds: float = 0.0  # stall: how long to go quiet; trickle: pause between bytes
    limit: int = 64 * 1024 * 1024  # endless: stop after this many bytes
    sent: int = 0  # endless/stall/trickle: bytes actually written to the client
    closed_at: float | None = None  # trickle: time.monotonic() when the client went away


class RepoSim:
    """An in-memory TUF repository signed with freshly generated ed25519 keys.

    After construction, root/timestamp/snapshot/targets version 1 are published.
    Typical use::

        sim.add_target("targets", "a/b.txt", b"data")
        sim.publish("targets")          # targets v+1, snapshot v+1, timestamp v+1
    """

    def __init__(self, consistent_snapshot: bool = True, scheme: str = "ed25519") -> None:
        self.consistent_snapshot = consistent_snapshot
        self.scheme = scheme  # key scheme for every key this repository generates
        self.lock = threading.RLock()
        self.serializer = JSONSerializer()
        self.signers: dict[str, list[Signer]] = {}
        self.files: dict[str, bytes] = {}
        self.misbehaviours: dict[str, Misbehaviour] = {}
        self.requests: list[str] = []
        self.root_history: dict[int, bytes] = {}
        self.published: set[str] = set()
        self.stop_event = threading.Event()
        self.metadata_url = ""
        self.targets_url = ""
        self.base_url = ""  # server root: metadata under base_url/metadata/, targets under /targets/

        self.root: Metadata[Root] = Metadata(
            Root(expires=expires_in(days=365), consistent_snapshot=consistent_snapshot)
        )
        self.roles: dict[str, Metadata] = {
            "timestamp": Metadata(Timestamp(expires=expires_in(days=1))),
            "snapshot": Metadata(Snapshot(expires=expires_in(days=7))),
            "targets": Metadata(Targets(expires=expires_in(days=30))),
        }
        for role in TOP_LEVEL_ROLES:
            self.add_key(role)
        self.publish_root()
        self.sign_and_serve("targets")
        self.published.add("targets")
        self.update_snapshot(bump=False)
        self.update_timestamp(bump=False)

    # ------------------------------------------------------------------ keys
    def add_key(self, role: str, signer: Signer | None = None) -> Signer:
        """Add a key for a top-level role to root (root itself not re-published)."""
        signer = signer or new_signer(self.scheme)
        self.root.signed.add_key(signer.public_key, role)
        self.signers.setdefault(role, []).append(signer)
        return signer

    def revoke_key(self, role: str, signer: Signer) -> None:
        self.root.signed.revoke_key(signer.public_key.keyid, role)
        self.signers[role] = [
            s for s in self.signers[role] if s.public_key.keyid != signer.public_key.keyid
        ]

    def replace_keys(self, role: str, count: int = 1) -> list[Signer]:
        """Revoke every key of a top-level role and add `count` new ones."""
        for s in list(self.signers.get(role, [])):
            self.revoke_key(role, s)
        return [self.add_key(role) for _ in range(count)]

    def set_threshold(self, role: str, threshold: int) -> None:
        self.root.signed.roles[role].threshold = threshold

    # ----------------------------------------------------------------- paths
    def role_path(self, role: str, version: int | None = None) -> str:
        """Logical (unquoted) server path of a role's metadata."""
        return unquote(self.request_name(role, version))

    def request_name(self, role: str, version: int | None = None) -> str:
        """The raw request path a conforming client uses for a role's metadata
        (role names URL-quoted with no safe characters)."""
        if role == "timestamp":
            return "metadata/timestamp.json"
        version = self.version(role) if version is None else version
        if role == "root":
            return f"metadata/{version}.root.json"
        if self.consistent_snapshot:
            return f"metadata/{version}.{quote_all(role)}.json"
        return f"metadata/{quote_all(role)}.json"

    def target_path(self, path: str, role: str | None = None) -> str:
        """Logical server path of a target (hash-prefixed when consistent)."""
        if not self.consistent_snapshot:
            return f"targets/{path}"
        info = self.find_target(path, role)
        dirname, sep, base = path.rpartition("/")
        return f"targets/{dirname}{sep}{info.hashes['sha256']}.{base}"

    def find_target(self, path: str, role: str | None = None) -> TargetFile:
        roles = [role] if role else [r for r in self.roles if r not in ("timestamp", "snapshot")]
        for r in roles:
            info = self.roles[r].signed.targets.get(path)
            if info is not None:
                return info
        raise KeyError(path)

    # ------------------------------------------------------------ publishing
    def version(self, role: str) -> int:
        if role == "root":
            return self.root.signed.version
        return self.roles[role].signed.version

    def sign(self, md: Metadata, signers: list[Signer]) -> bytes:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        return md.to_bytes(self.serializer)

    def publish_root(self, signers: list[Signer] | None = None) -> bytes:
        """Sign the current root with `signers` (default: its own root keys) and
        serve it as N.root.json (and root.json)."""
        with self.lock:
            data = self.sign(self.root, signers or self.signers["root"])
            v = self.root.signed.version
            self.root_history[v] = data
            self.files[f"metadata/{v}.root.json"] = data
            self.files["metadata/root.json"] = data
            return data

    def rotate_root(self, change=None, signers: list[Signer] | None = None) -> bytes:
        """Publish root version+1.  `change(sim)` edits keys/thresholds first.
        By default signed by the union of the old and the new root keys."""
        old = list(self.signers["root"])
        if change is not None:
            change(self)
        self.root.signed.version += 1
        if signers is None:
            signers = _dedupe(old + self.signers["root"])
        return self.publish_root(signers)

    def sign_and_serve(self, role: str, signers: list[Signer] | None = None) -> bytes:
        """Sign a non-root role at its current version and serve it."""
        with self.lock:
            md = self.roles[role]
            data = self.sign(md, self.signers[role] if signers is None else signers)
            self.files[self.role_path(role)] = data
            return data

    def targets_roles(self) -> list[str]:
        return [r for r in self.roles if r not in ("timestamp", "snapshot")]

    def update_snapshot(self, bump: bool = True, hashes: bool = False) -> bytes:
        snap = self.roles["snapshot"].signed
        for role in self.targets_roles():
            if role not in self.published:
                continue
            if hashes:
                data = self.files[self.role_path(role)]
                snap.meta[f"{role}.json"] = MetaFile(
                    version=self.version(role),
                    length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()},
                )
            else:
                snap.meta[f"{role}.json"] = MetaFile(version=self.version(role))
        if bump:
            snap.version += 1
        return self.sign_and_serve("snapshot")

    def update_timestamp(self, bump: bool = True, hashes: bool = False) -> bytes:
        ts = self.roles["timestamp"].signed
        v = self.version("snapshot")
        if hashes:
            data = self.files[self.role_path("snapshot")]
            ts.snapshot_meta = MetaFile(
                version=v, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
            )
        else:
            ts.snapshot_meta = MetaFile(version=v)
        if bump:
            ts.version += 1
        return self.sign_and_serve("timestamp")

    def publish(self, *roles: str, snapshot: bool = True, timestamp: bool = True,
                hashes: bool = False) -> None:
        """Re-sign changed targets roles (version+1; a never-published role is
        published at version 1), then a new snapshot and timestamp."""
        with self.lock:
            for role in roles:
                if role in ("snapshot", "timestamp"):
                    continue
                if role in self.published:
                    self.roles[role].signed.version += 1
                self.sign_and_serve(role)
                self.published.add(role)
            if snapshot:
                self.update_snapshot(hashes=hashes)
            if timestamp:
                self.update_timestamp(hashes=hashes)

    # --------------------------------------------------------------- targets
    def add_target(self, role: str, path: str, data: bytes, custom: dict | None = None) -> TargetFile:
        """List a target in `role` (not yet re-signed) and store its bytes."""
        info = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            info.unrecognized_fields["custom"] = custom
        with self.lock:
            self.roles[role].signed.targets[path] = info
            self.files[self.target_path(path, role)] = data
        return info

    def add_delegation(self, parent: str, name: str, *, paths: list[str] | None = None,
                       hash_prefixes: list[str] | None = None, terminating: bool = False,
                       threshold: int = 1, keys: int = 1) -> DelegatedRole:
        """Delegate `name` from `parent` with fresh keys (parent not re-signed;
        call publish(parent, name) afterwards)."""
        if paths is None and hash_prefixes is None:
            paths = ["*"]
        parent_md = self.roles[parent].signed
        if parent_md.delegations is None:
            parent_md.delegations = Delegations(keys={}, roles={})
        role = DelegatedRole(name=name, keyids=[], threshold=threshold, terminating=terminating,
                             paths=paths, path_hash_prefixes=hash_prefixes)
        parent_md.delegations.roles[name] = role
        for _ in range(keys):
            s = new_signer(self.scheme)
            parent_md.add_key(s.public_key, name)
            self.signers.setdefault(name, []).append(s)
        self.roles[name] = Metadata(Targets(expires=expires_in(days=30)))
        return role

    # ---------------------------------------------------------------- server
    def misbehave(self, path: str, kind: str, **kw) -> Misbehaviour:
        m = Misbehaviour(kind=kind, **kw)
        with self.lock:
            self.misbehaviours[path] = m
        return m

    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    def metadata_requests(self) -> list[str]:
        return [r for r in self.requests if r.startswith("metadata/")]

    def target_requests(self) -> list[str]:
        return [r for r in self.requests if r.startswith("targets/")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: "SimServer"

    def log_message(self, format, *args):  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:  # noqa: N802
        sim = self.server.sim
        raw = self.path.lstrip("/")
        with sim.lock:
            sim.requests.append(raw)
            logical = unquote(urlsplit(self.path).path).lstrip("/")
            bad = sim.misbehaviours.get(logical)
            data = sim.files.get(logical)
        try:
            if bad is None:
                self._send(data)
            elif bad.kind == "bytes":
                self._send(bad.data)
            elif bad.kind == "status":
                self.send_error(bad.status)
            elif bad.kind == "stall":
                self._stall(bad, data if data is not None else bad.data)
            elif bad.kind == "trickle":
                self._trickle(bad, data if data is not None else bad.data)
            elif bad.kind == "endless":
                self._endless(bad, sim)
            else:
                raise ValueError(bad.kind)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, data: bytes | None) -> None:
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stall(self, bad: Misbehaviour, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        # Send one byte so the client sees a started body, then go quiet.
        if data:
            self.wfile.write(data[:1])
            self.wfile.flush()
            bad.sent += 1
        self.server.sim.stop_event.wait(bad.seconds)
        self.wfile.write(data[1:])

    def _trickle(self, bad: Misbehaviour, data: bytes) -> None:
        """The whole file, announced with its true length, one byte every
        `bad.seconds`: never quiet for long, but slower than any real link."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.flush()
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                bad.sent += 1
                if self.server.sim.stop_event.wait(bad.seconds):
                    return
        except (BrokenPipeError, ConnectionResetError):
            bad.closed_at = time.monotonic()
            raise

    def _endless(self, bad: Misbehaviour, sim: RepoSim) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        chunk = (bad.data or b"A") * (65536 // max(1, len(bad.data or b"A")))
        deadline = time.monotonic() + 60
        while bad.sent < bad.limit and time.monotonic() < deadline and not sim.stop_event.is_set():
            self.wfile.write(chunk)
            bad.sent += len(chunk)


class SimServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sim: RepoSim) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.sim = sim
        port = self.server_address[1]
        sim.base_url = f"http://127.0.0.1:{port}"
        sim.metadata_url = f"{sim.base_url}/metadata/"
        sim.targets_url = f"{sim.base_url}/targets/"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> "SimServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sim.stop_event.set()
        self.shutdown()
        self.server_close()
