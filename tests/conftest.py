"""Shared fixtures for the Outpost black-box test suite.

Binaries are looked up in $OUTPOST_BIN_DIR (default: <repo>/target/debug).
A missing binary makes the tests that need it FAIL (never skip): build first.

Set OUTPOST_FINDINGS=/some/file.md to have every failing test appended there
with the last commands it ran and their output (for handing to the Rust side).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reposim import RepoSim, SimServer, quote_all  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(os.environ.get("OUTPOST_BIN_DIR", REPO_ROOT / "target" / "debug"))
DEFAULT_CMD_TIMEOUT = 60

# Commands run by the current test, newest last (for failure reports).
_COMMAND_LOG: list["Result"] = []


def binary(name: str) -> Path:
    path = BIN_DIR / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"binary {path} not found or not executable: build it first "
                    f"(cargo build) or set OUTPOST_BIN_DIR", pytrace=False)
    return path


def faketime_prefix(offset: str) -> list[str]:
    """Command prefix running a program with its clock moved by `offset` (e.g. '+10d')."""
    exe = shutil.which("faketime")
    if exe is None:
        pytest.fail("faketime is not installed: apt-get install faketime", pytrace=False)
    return [exe, "-f", offset]


@dataclasses.dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def describe(self) -> str:
        return (f"command: {self.command}\nexit code: {self.returncode} "
                f"(after {self.elapsed:.1f}s)\nstdout: {self.stdout[-1500:]}\n"
                f"stderr: {self.stderr[-3000:]}")


def run(argv: list[str], timeout: float = DEFAULT_CMD_TIMEOUT, env: dict | None = None,
        stdin: bytes | None = None) -> Result:
    argv = [str(a) for a in argv]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=env,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)
        res = Result(argv, proc.returncode, proc.stdout.decode(errors="replace"),
                     proc.stderr.decode(errors="replace"), time.monotonic() - start)
    except subprocess.TimeoutExpired as e:
        res = Result(argv, -999, (e.stdout or b"").decode(errors="replace"),
                     (e.stderr or b"").decode(errors="replace") + f"\n[killed after {timeout}s]",
                     time.monotonic() - start)
    _COMMAND_LOG.append(res)
    return res


# Loose vocabularies for error messages (stderr must mention one of them).
VERSION_WORDS = ("version", "rollback", "roll back", "downgrade")
SIG_WORDS = ("signature", "threshold", "signed", "unsigned")
HASH_WORDS = ("hash", "digest", "sha256", "mismatch")
LENGTH_WORDS = ("length", "size", "large", "exceed", "too long", "too many bytes", "limit",
                "endless", "more than", "truncat")
EXPIRY_WORDS = ("expired", "expir")


def assert_ok(res: Result) -> Result:
    assert res.returncode == 0, "expected exit code 0\n" + res.describe()
    return res


def assert_fails(res: Result, *words: str) -> Result:
    """Exit code 1 and, if words are given, stderr mentions at least one of them
    (case-insensitive)."""
    assert res.returncode == 1, "expected exit code 1\n" + res.describe()
    if words:
        err = res.stderr.lower()
        assert any(w.lower() in err for w in words), (
            f"expected stderr to mention one of {words!r}\n" + res.describe())
    return res


class TufClient:
    """Drives `outpost-agent tuf-client` with the tuf-conformance CLI protocol."""

    def __init__(self, workdir: Path, sim: RepoSim | None = None,
                 metadata_url: str | None = None, targets_url: str | None = None) -> None:
        self.exe = binary("outpost-agent")
        self.workdir = workdir
        self.metadata_dir = workdir / "metadata"
        self.target_dir = workdir / "targets"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.target_dir.mkdir(parents=True, exist_ok=True)
        self.sim = sim
        self.metadata_url = metadata_url or (sim.metadata_url if sim else "")
        self.targets_url = targets_url or (sim.targets_url if sim else "")

    def _argv(self, args: list[str], faketime: str | None) -> list[str]:
        pre = faketime_prefix(faketime) if faketime else []
        return [*pre, str(self.exe), "tuf-client", *args]

    def init(self, root: bytes | None = None, **kw) -> Result:
        if root is None:
            assert self.sim is not None
            root = self.sim.root_history[1]
        trusted = self.workdir / "initial_root.json"
        trusted.write_bytes(root)
        return run(self._argv(["--metadata-dir", str(self.metadata_dir), "init", str(trusted)],
                              kw.pop("faketime", None)), **kw)

    def refresh(self, *, faketime: str | None = None, timeout_flag: int | None = None,
                **kw) -> Result:
        args = ["--metadata-dir", str(self.metadata_dir), "--metadata-url", self.metadata_url]
        if timeout_flag is not None:
            args += ["--timeout", str(timeout_flag)]
        return run(self._argv([*args, "refresh"], faketime), **kw)

    def download(self, *names: str, faketime: str | None = None,
                 timeout_flag: int | None = None, **kw) -> Result:
        args = ["--metadata-dir", str(self.metadata_dir), "--metadata-url", self.metadata_url]
        for n in names:
            args += ["--target-name", n]
        args += ["--target-base-url", self.targets_url, "--target-dir", str(self.target_dir)]
        if timeout_flag is not None:
            args += ["--timeout", str(timeout_flag)]
        return run(self._argv([*args, "download"], faketime), **kw)

    # ---- what the client left on disk
    def trusted(self, role: str) -> bytes | None:
        p = self.metadata_dir / f"{quote_all(role)}.json"
        return p.read_bytes() if p.exists() else None

    def trusted_files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.metadata_dir.iterdir()) if p.is_file()}

    def target_files(self) -> dict[str, bytes]:
        """Every file under the target dir (recursively, including temp files)."""
        return {str(p.relative_to(self.target_dir)): p.read_bytes()
                for p in sorted(self.target_dir.rglob("*")) if p.is_file()}

    def stored_target(self, path: str) -> bytes | None:
        p = self.target_dir / quote_all(path)
        return p.read_bytes() if p.exists() else None


def trusted_version(data: bytes | None) -> int | None:
    if data is None:
        return None
    import json
    return json.loads(data)["signed"]["version"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _reset_command_log():
    _COMMAND_LOG.clear()
    yield


def _start_sim(consistent_snapshot: bool = True, scheme: str = "ed25519"):
    sim = RepoSim(consistent_snapshot=consistent_snapshot, scheme=scheme)
    server = SimServer(sim).start()
    return sim, server


@pytest.fixture
def sim():
    """A consistent-snapshot repository served on 127.0.0.1 (ephemeral port)."""
    s, server = _start_sim(True)
    yield s
    server.stop()


@pytest.fixture
def make_sim():
    """Factory: make_sim(consistent_snapshot=False, scheme=...) -> a served RepoSim."""
    servers = []

    def factory(consistent_snapshot: bool = True, scheme: str = "ed25519") -> RepoSim:
        s, server = _start_sim(consistent_snapshot, scheme)
        servers.append(server)
        return s

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def client(sim, tmp_path) -> TufClient:
    """A tuf-client working dir bound to the `sim` repository (not initialised)."""
    return TufClient(tmp_path / "client", sim)


@pytest.fixture
def ready_client(client) -> TufClient:
    """`client` after a successful init."""
    assert_ok(client.init())
    return client


# ---------------------------------------------------------------- findings
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    path = os.environ.get("OUTPOST_FINDINGS")
    if not path or report.when != "call" or not report.failed:
        return
    lines = [f"\n### {item.nodeid}\n"]
    msg = str(report.longrepr.reprcrash.message) if hasattr(report.longrepr, "reprcrash") \
        else str(report.longrepr)
    head = []
    for ln in (msg or "?").splitlines():
        if ln.strip().startswith("command:"):
            break
        head.append(ln.strip())
    lines.append(f"- expected/failed: {' | '.join(head)[:600]}\n")
    for res in _COMMAND_LOG[-2:]:
        lines.append(f"- command: `{res.command[:600]}`\n")
        lines.append(f"  - exit {res.returncode}; stderr tail: "
                     f"`{res.stderr.strip()[-400:].replace(chr(10), ' | ')}`\n")
    with open(path, "a") as f:
        f.writelines(lines)
