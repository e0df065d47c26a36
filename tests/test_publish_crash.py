"""A publish is all-or-nothing across a crash of `outpost-server`, and no versioned
metadata name (`N.root.json`, `N.snapshot.json`, `N.<role>.json`) is ever served with
two contents.

The crash points are found without help from the server: it runs under strace, which
holds every file-system mutation (rename, link, unlink, mkdir) at its entry for
OUTPOST_PUBLISH_CRASH_DELAY_MS (default 40 ms) and prints it as it begins. The test
counts the mutations a publish begins and SIGKILLs the server while the k-th one is
held (so it never happens), for k = 1, 2, ... until a publish completes: every prefix
of the publish's steps is a crash state. A SIGKILLed process keeps its page cache, so
this tests the order of the steps, not fsync.

After each crash the server restarts on the same data_dir and:
- every versioned file that was on disk (hence servable) at the kill is served with
  the same bytes, before and after the retry;
- python-tuf's ngclient (one that trusted the state before the publish, and one from
  root v1) and `outpost-agent tuf-client` refresh without error;
- the pipeline's retry lands: the identical request succeeds. On every other cut the
  pipeline first retries with other content under the same role and root versions
  (it re-signed after losing its copy): that lands when the first publish never
  committed, and is refused when it did (then the identical retry succeeds).

Two publishes are cut: a release (a new firmware role version), and a root rotation
that replaces the targets key with re-signed targets and a release. Strace must be
installed (scripts/setup.sh installs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from conftest import (
    OutpostRepo,
    OutpostServer,
    TufClient,
    assert_ok,
    http_get,
    http_post,
)

DELAY_MS = int(os.environ.get("OUTPOST_PUBLISH_CRASH_DELAY_MS", "40"))
MUTATIONS = "rename,renameat,renameat2,link,linkat,unlink,unlinkat,mkdir,mkdirat"
ENTRY = re.compile(r"^\d+\s+(?:" + MUTATIONS.replace(",", "|") + r")\(.*", re.M)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_versioned(name: str) -> bool:
    head = name.split(".", 1)[0]
    return head.isdigit() and name.endswith(".json")


def versioned_on_disk(server: OutpostServer) -> dict[str, str]:
    return {p.name: sha(p.read_bytes()) for p in server.metadata_dir.iterdir()
            if p.is_file() and is_versioned(p.name)}


# ------------------------------------------------------------------ the pipeline
def consistent_name(path: str, digest: str) -> str:
    d, _, n = path.rpartition("/")
    return f"{d}/{digest}.{n}" if d else f"{digest}.{n}"


def publish_request(repo_dir: Path, status: dict) -> tuple[dict, list[tuple[str, Path]]]:
    """What `outpost repo push` sends for `repo_dir` to a server in `status`: the
    publish body, and the target files it names (to upload first)."""
    meta = repo_dir / "metadata"
    local_root = json.loads((meta / "root.json").read_bytes())["signed"]["version"]
    roots = [json.loads((meta / f"{v}.root.json").read_bytes())
             for v in range(status["root_version"] + 1, local_root + 1)]
    roles, uploads = {}, []
    for p in sorted(meta.glob("*.json")):
        stem = p.name[:-5]
        if stem[:1].isdigit() or stem in ("root", "timestamp", "snapshot"):
            continue
        name = urllib.parse.unquote(stem)
        doc = json.loads(p.read_bytes())
        if doc["signed"]["version"] <= status["roles"].get(name, 0):
            continue
        roles[name] = doc
        for path, info in doc["signed"]["targets"].items():
            local = repo_dir / "targets" / consistent_name(path, info["hashes"]["sha256"])
            if local.exists():
                uploads.append((path, local))
    return {"roots": roots, "roles": roles}, uploads


def upload(server: OutpostServer, token: str, uploads: list[tuple[str, Path]]) -> None:
    for path, file in uploads:
        status, body = http_post(f"{server.url}/api/v1/targets?path={urllib.parse.quote(path)}",
                                 file.read_bytes(), token, "application/octet-stream")
        assert status == 200, f"upload of {path}: {status} {body[:300]!r}"


def post_publish(server: OutpostServer, token: str, body: dict) -> tuple[int, bytes]:
    return http_post(f"{server.url}/api/v1/publish", json.dumps(body).encode(), token,
                     "application/json", timeout=60)


# ------------------------------------------------------------------ the clients
class Clients:
    """ngclient and tuf-client metadata directories that trust the state before the
    publish; each check works on fresh copies of them."""

    def __init__(self, base: Path, server: OutpostServer, root1: bytes) -> None:
        self.base = base
        self.server = server
        self.root1 = root1
        self.n = 0
        self.ng = base / "ng-trusted"
        self.ng.mkdir(parents=True)
        (self.ng / "root.json").write_bytes(root1)
        self.updater(self.ng).refresh()
        self.tc = TufClient(base / "tc-trusted", metadata_url=f"{server.url}/metadata/",
                            targets_url=f"{server.url}/targets/")
        assert_ok(self.tc.init(root=root1))
        assert_ok(self.tc.refresh())

    def updater(self, md: Path) -> Updater:
        tg = md.parent / (md.name + "-targets")
        tg.mkdir(exist_ok=True)
        return Updater(str(md), f"{self.server.url}/metadata/", str(tg),
                       f"{self.server.url}/targets/", bootstrap=None)

    def check(self, what: str, target: tuple[str, str] | None = None) -> None:
        """Both clients (trusting the old state, and from root v1) refresh; with
        `target` = (path, sha256) each finds it signed with that hash."""
        self.n += 1
        work = self.base / f"check-{self.n}"
        fresh = work / "ng-fresh"
        fresh.mkdir(parents=True)
        (fresh / "root.json").write_bytes(self.root1)
        for md in (fresh, work / "ng-trusted"):
            if md.name == "ng-trusted":
                shutil.copytree(self.ng, md)
            up = self.updater(md)
            try:
                up.refresh()
                info = up.get_targetinfo(target[0]) if target else None
            except Exception as e:  # noqa: BLE001 - any failure of the reference client
                pytest.fail(f"{what}: python-tuf ngclient ({md.name}) failed: {type(e).__name__}: {e}",
                            pytrace=False)
            if target:
                assert info is not None and info.hashes.get("sha256") == target[1], \
                    f"{what}: ngclient ({md.name}) does not find {target[0]} with sha256 {target[1]}"
        tc = TufClient(work / "tc", metadata_url=f"{self.server.url}/metadata/",
                       targets_url=f"{self.server.url}/targets/")
        shutil.copytree(self.tc.metadata_dir, tc.metadata_dir, dirs_exist_ok=True)
        res = tc.refresh()
        assert res.returncode == 0, f"{what}: tuf-client refresh failed\n" + res.describe()
        if target:
            res = tc.download(target[0])
            assert res.returncode == 0, f"{what}: tuf-client download failed\n" + res.describe()
            assert sha(tc.stored_target(target[0]) or b"") == target[1], what


# ------------------------------------------------------------------ cutting
class StraceLost(Exception):
    """strace ended before the cut (it gives up on some event sequences): run the
    same cut again."""


class Cut:
    """One publish under strace, SIGKILLed when its k-th file-system mutation begins."""

    def __init__(self, server: OutpostServer, trace: Path) -> None:
        self.server = server
        self.trace = trace
        log = open(server.log, "ab")
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), "-e", "signal=none",
             "-e", f"trace={MUTATIONS}", "-e", f"inject={MUTATIONS}:delay_enter={DELAY_MS * 1000}",
             str(server.exe), "--config", str(server.config), "serve"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.pid: int | None = None
        try:
            deadline = time.monotonic() + 30
            while True:
                assert self.proc.poll() is None, "outpost-server under strace exited:\n" + server.log_text()[-3000:]
                try:
                    if http_get(f"{server.url}/healthz", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "outpost-server under strace did not start"
                time.sleep(0.05)
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            assert children, "strace has no child process"
            self.pid = int(children[0])
        except BaseException:
            self.stop()
            raise

    def entries(self) -> list[str]:
        try:
            return ENTRY.findall(self.trace.read_text(errors="replace"))
        except FileNotFoundError:
            return []

    def publish(self, token: str, body: dict, k: int) -> tuple[bool, str, tuple | None]:
        """POSTs `body`; SIGKILLs the server while the k-th mutation after the POST is
        held. -> (killed, the held mutation, the answer when it finished first).
        Raises StraceLost when strace ended on its own (the cut did not happen)."""
        mark = self.mark = len(self.entries())
        answer: list = []
        t = threading.Thread(target=lambda: answer.append(self._post(token, body)), daemon=True)
        t.start()
        held = ""
        while t.is_alive():
            entries = self.entries()
            if len(entries) >= mark + k:
                held = entries[mark + k - 1]
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.002)
        lost = self.proc.poll() is not None
        if held and not lost and self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)  # first the server: its held syscall never runs
        self.stop()
        t.join(10)
        if lost:
            raise StraceLost(self.trace.read_text(errors="replace")[-500:])
        return bool(held), held, (answer[0] if answer and not held else None)

    def _post(self, token: str, body: dict):
        try:
            return post_publish(self.server, token, body)
        except OSError as e:
            return (0, str(e).encode())

    def stop(self) -> None:
        """Kills strace and the server (one process group) and waits for both."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.pid is not None and not _gone(self.pid):
            assert time.monotonic() < deadline, f"outpost-server (pid {self.pid}) did not end after SIGKILL"
            time.sleep(0.005)


def mark_of(cut: Cut) -> int:
    return cut.mark


def describe(entry: str) -> str:
    """`123 renameat2(AT_FDCWD, "/a/.b.tmp-1", AT_FDCWD, "/a/b", 0` -> `rename b`."""
    call = entry.split(None, 1)[1].split("(", 1)[0]
    names = [p.rsplit("/", 1)[-1] for p in re.findall(r'"([^"]*)"', entry)]
    return f"{call.rstrip('at2').rstrip('at')} {names[-1] if names else '?'}"


def _gone(pid: int) -> bool:
    """No thread of process `pid` runs any more (it may be a zombie: its files,
    and so its repository lock, are released)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return all(st in ("Z", "X") for st in states)


def status_of(server: OutpostServer, token: str) -> dict:
    code, body = http_get(f"{server.url}/api/v1/repository", token=token)
    assert code == 200, body[:300]
    return json.loads(body)


def cut_every_step(tmp_path: Path, server: OutpostServer, token: str, clients: Clients,
                   body_a: dict, uploads_a, target_a, body_b: dict, uploads_b, target_b,
                   label: str) -> int:
    """Cuts the publish of body_a at every step; returns how many cuts there were.
    Leaves the server stopped with body_a published."""
    baseline = tmp_path / f"{label}-baseline"
    shutil.copytree(server.data_dir, baseline)
    served_before = versioned_on_disk(server)
    k = 0
    while True:
        k += 1
        assert k < 200, f"{label}: the publish never completed"
        seen = dict(served_before)
        for attempt in range(5):
            shutil.rmtree(server.data_dir)
            shutil.copytree(baseline, server.data_dir)
            cut = Cut(server, tmp_path / f"{label}-trace-{k}-{attempt}.txt")
            try:
                upload(server, token, uploads_a)
                killed, held, answer = cut.publish(token, body_a, k)
                break
            except StraceLost as e:
                print(f"{label}, step {k}: strace ended by itself, again: {e}")
            finally:
                cut.stop()
        else:
            pytest.fail(f"{label}, step {k}: strace ended by itself 5 times", pytrace=False)
        what = f"{label}, crash before step {k} ({held.strip()})"
        if not killed:
            assert answer is not None and answer[0] == 200, f"{label}: uncut publish: {answer}"
        on_disk = versioned_on_disk(server)
        for name, digest in on_disk.items():
            assert seen.setdefault(name, digest) == digest, \
                f"{what}: {name} changed its bytes (it was servable before with other content)"
        server.start()
        try:
            for name, digest in seen.items():
                code, data = server.metadata(name)
                if name in on_disk:
                    assert code == 200 and sha(data) == digest, \
                        f"{what}: after restart {name} answers {code} with other bytes than before the crash"
            clients.check(f"{what}, after restart")
            landed = target_a
            if killed and k % 2 == 0:
                # The pipeline lost its copy and signed the same versions again.
                upload(server, token, uploads_b)
                code_b, answer_b = post_publish(server, token, body_b)
                assert code_b == 200 or 400 <= code_b < 500, f"{what}: other content: {code_b} {answer_b[:300]!r}"
                if code_b == 200:
                    landed = target_b
            if landed is target_a:
                code, answer_a = post_publish(server, token, body_a)
                assert code == 200, f"{what}: the pipeline's identical retry was refused: {code} {answer_a[:400]!r}"
            for name, digest in versioned_on_disk(server).items():
                assert seen.setdefault(name, digest) == digest, \
                    f"{what}: {name} was rewritten with other bytes by the retry"
            for name, digest in seen.items():
                code, data = server.metadata(name)
                assert code == 200 and sha(data) == digest, \
                    f"{what}: after the retry {name} answers {code} with other bytes than before"
            clients.check(f"{what}, after the retry", landed)
        finally:
            server.terminate()
        if not killed:
            steps = cut.entries()[mark_of(cut):]
            print(f"{label}: {len(steps)} steps: " + ", ".join(describe(e) for e in steps))
            return k - 1


@pytest.fixture
def crash_setup(tmp_path):
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed: apt-get install strace (scripts/setup.sh)", pytrace=False)
    repo = OutpostRepo(tmp_path / "signer")
    repo.init()
    repo.delegate_firmware()
    server = OutpostServer(tmp_path, repo)
    token = server.token()
    server.start()
    try:
        repo.cli("repo", "push", "--repo", repo.dir, "--server", server.url, "--token", token)
        fw = tmp_path / "builds" / "fw.img"
        fw.parent.mkdir(parents=True)
        fw.write_bytes(b"release 1.0.0")
        repo.cli("release", "publish", "--repo", repo.dir, "--firmware", fw, "--hardware-class", "rpi4",
                 "--version", "1.0.0", "--key", repo.key("firmware"), "--server", server.url, "--token", token)
        clients = Clients(tmp_path / "clients", server, repo.root1)
        yield repo, server, token, clients
    finally:
        server.stop()


def _release(repo: OutpostRepo, repo_dir: Path, tmp_path: Path, version: str, data: bytes) -> tuple[str, str]:
    fw = tmp_path / "builds" / version / "fw.img"
    fw.parent.mkdir(parents=True, exist_ok=True)
    fw.write_bytes(data)
    repo.cli("release", "publish", "--repo", repo_dir, "--firmware", fw, "--hardware-class", "rpi4",
             "--version", version, "--key", repo.key("firmware"))
    return f"firmware/rpi4/{version}/fw.img", sha(data)


def _rotation(repo: OutpostRepo, repo_dir: Path, expires: str) -> None:
    repo.cli("repo", "rotate-root", "--repo", repo_dir, "--sign-key", repo.key("root1"),
             "--sign-key", repo.key("root2"), "--targets-key", repo.key("targets2"),
             "--expires", expires)
    repo.cli("repo", "delegate", "--repo", repo_dir, "--role", "firmware",
             "--delegate-key", repo.key("firmware"), "--threshold", "1",
             "--paths", "firmware/rpi4/*/*", "--sign-key", repo.key("targets2"))


def test_publish_survives_sigkill_at_every_step(tmp_path, crash_setup):
    repo, server, token, clients = crash_setup
    started = time.monotonic()
    cuts = {}
    def release(d: Path, variant: str) -> tuple[str, str]:
        return _release(repo, d, tmp_path, "1.1.0" if variant == "a" else "1.1.1", f"release {variant}".encode())

    def rotation(d: Path, variant: str) -> tuple[str, str]:
        # Other content under the same root version: another expiry.
        _rotation(repo, d, "300d" if variant == "a" else "301d")
        return _release(repo, d, tmp_path, "1.2.0" if variant == "a" else "1.2.1", f"rotation {variant}".encode())

    for label, change in [("release", release), ("rotation", rotation)]:
        status = status_of(server, token)
        server.terminate()
        dirs = {}
        for variant in ("a", "b"):
            d = tmp_path / f"{label}-{variant}"
            shutil.copytree(repo.dir, d)
            dirs[variant] = d
        target_a = change(dirs["a"], "a")
        target_b = change(dirs["b"], "b")
        body_a, uploads_a = publish_request(dirs["a"], status)
        body_b, uploads_b = publish_request(dirs["b"], status)
        assert body_a["roles"] and (label != "rotation" or body_a["roots"]), body_a.keys()
        cuts[label] = cut_every_step(tmp_path, server, token, clients, body_a, uploads_a, target_a,
                                     body_b, uploads_b, target_b, label)
        # The pipeline's copy is now the one that landed; clients move on.
        shutil.rmtree(repo.dir)
        shutil.copytree(dirs["a"], repo.dir)
        server.start()
        clients = Clients(tmp_path / f"clients-after-{label}", server, repo.root1)
    print(f"publish cut at every step: {cuts} in {time.monotonic() - started:.1f}s")
    for label, n in cuts.items():
        assert n >= 3, f"{label}: only {n} file-system steps were seen in a publish"
