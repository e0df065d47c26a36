"""Shared fixtures for the Outpost black-box test suite.

Binaries are looked up in $OUTPOST_BIN_DIR (default: <repo>/target/debug).
A missing binary makes the tests that need it FAIL (never skip): build first.

Set OUTPOST_FINDINGS=/some/file.md to have every failing test appended there
with the last commands it ran and their output (for handing to the Rust side).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reposim import RepoSim, SimServer, quote_all  # noqa: E402
from pki import TlsFiles  # noqa: E402

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
        stdin: bytes | None = None, cwd: Path | str | None = None) -> Result:
    argv = [str(a) for a in argv]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd=cwd,
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


# ------------------------------------------------- outpost signer / server / agent
FW_PATH = "firmware/rpi4/1.0.0/fw.img"
FW_BYTES = b"OUTPOST-FW\x00" + bytes(range(256)) * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5, token: str | None = None, context=None) -> tuple[int, bytes]:
    status, _, body = http_get_full(url, timeout=timeout, token=token, context=context)
    return status, body


def http_get_full(url: str, timeout: float = 5, token: str | None = None,
                  headers: dict | None = None, context=None) -> tuple[int, dict[str, str], bytes]:
    """GET -> (status, headers with lower-case names, body); `context`: the TLS one
    (an ssl.SSLContext) for https:// URLs."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def http_post(url: str, body: bytes, token: str | None, content_type: str,
              timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def parse_token(stdout: str) -> str:
    text = stdout.strip()
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and "token" in doc:
            return str(doc["token"])
    except ValueError:
        pass
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert lines, "token create printed nothing"
    return lines[-1].split()[-1]


def toml_str(value) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (recursively, hidden and temporary files included)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class OutpostRepo:
    """Keys and a local repository made with the `outpost` signer CLI."""

    def __init__(self, base: Path) -> None:
        self.exe = binary("outpost")
        self.base = base
        self.keys = base / "keys"
        self.keys.mkdir(parents=True)
        self.dir = base / "repo"

    def cli(self, *args, check: bool = True, **kw):
        res = run([self.exe, *args], **kw)
        if check:
            assert_ok(res)
        return res

    def key(self, name: str) -> Path:
        path = self.keys / name
        if not path.exists():
            res = self.cli("keys", "generate", "--out", path)
            assert path.exists() and Path(f"{path}.pub").exists(), res.describe()
        return path

    def init(self, *extra: str) -> None:
        self.cli("repo", "init", "--repo", self.dir,
                 "--root-key", self.key("root1"), "--root-key", self.key("root2"),
                 "--root-key", self.key("root3"), "--threshold", "2",
                 "--targets-key", self.key("targets"), "--snapshot-key", self.key("snapshot"),
                 "--timestamp-key", self.key("timestamp"), *extra)

    def director_init(self) -> None:
        """`outpost director init`: devices learn the director from the targets role."""
        self.cli("director", "init", "--repo", self.dir, "--root-key", self.key("director-root"),
                 "--director-key", self.key("director"), "--sign-key", self.key("targets"))

    def delegate_firmware(self, repo: Path | None = None, role: str = "firmware",
                          paths: str = "firmware/rpi4/*/*") -> None:
        self.cli("repo", "delegate", "--repo", repo or self.dir, "--role", role,
                 "--delegate-key", self.key(role), "--threshold", "1", "--paths", paths,
                 "--sign-key", self.key("targets"))

    def publish(self, data: bytes, version: str, hardware_class: str = "rpi4",
                name: str = "fw.img", key: str = "firmware", server=None, token: str | None = None,
                check: bool = True, extra: tuple = ()):
        """`outpost release publish` of `data` (written to a file called `name`)."""
        src = self.base / "builds" / version / name
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        args = ["release", "publish", "--repo", self.dir, "--firmware", src,
                "--hardware-class", hardware_class, "--version", version, "--key", self.key(key),
                *extra]
        if server is not None:
            args += ["--server", server.url, "--token", token]
        return self.cli(*args, check=check)

    @property
    def root1(self) -> bytes:
        return (self.dir / "metadata" / "1.root.json").read_bytes()


TESTBED_MEASUREMENT = '\n[attestation.classes."*"]\npcrs = [16, 23]\nevent_types = ["slot_boot"]\ntestbed = true\n'


def swtpm_localca_files() -> list[str]:
    """swtpm's local CA (root and intermediate) that `swtpm_setup --create-ek-cert`
    signs EK certificates with; made on this machine by the first such run, so one is
    run here if there has been none."""
    statedir = "/var/lib/swtpm-localca"
    conf = Path("/etc/swtpm-localca.conf")
    if conf.exists():
        for line in conf.read_text().splitlines():
            if line.strip().startswith("statedir"):
                statedir = line.split("=", 1)[1].strip()
    files = [Path(statedir) / "swtpm-localca-rootca-cert.pem", Path(statedir) / "issuercert.pem"]
    if not all(f.exists() for f in files):
        with tempfile.TemporaryDirectory() as d:
            assert_ok(run(["swtpm_setup", "--tpm2", "--tpmstate", d, "--create-ek-cert", "--overwrite"], timeout=120))
    for f in files:
        assert f.exists(), f"{f} missing: swtpm_setup --create-ek-cert should have made it (bash scripts/setup.sh installs swtpm-tools)"
    return [str(f) for f in files]


class OutpostServer:
    """`outpost-server serve` on 127.0.0.1, config written from the docs' format.

    `repository` adds keys to the [repository] table (e.g. timestamp_expiry="4s").
    `extra_toml` adds whole tables (e.g. [database], [director]).
    The server can be stopped and started again on the same data_dir and port."""

    def __init__(self, base: Path, repo: OutpostRepo, name: str = "server",
                 repository: dict[str, str] | None = None,
                 attestation: dict[str, str] | None = None, extra_toml: str = "",
                 measurement: str | None = None, tls: "TlsFiles | None" = None) -> None:
        self.exe = binary("outpost-server")
        self.port = free_port()
        # Plain HTTP on loopback, said explicitly, unless the test gives the server a
        # certificate (tests/test_tls.py).
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.config = base / f"{name}.toml"
        self.data_dir = base / f"{name}-data"
        self.data_dir.mkdir()
        cfg = (
            f'listen = "127.0.0.1:{self.port}"\n'
            + ("" if tls else "plain_http = true\n")
            + f"data_dir = {toml_str(self.data_dir)}\n\n"
            "[repository]\n"
            f'trusted_root = {toml_str(repo.dir / "metadata" / "1.root.json")}\n'
            f'snapshot_key = {toml_str(repo.key("snapshot"))}\n'
            f'timestamp_key = {toml_str(repo.key("timestamp"))}\n'
        )
        for k, v in (repository or {}).items():
            cfg += f"{k} = {_toml_value(v)}\n"
        # Devices enroll with EK certificates from swtpm's local CA (what
        # `swtpm_setup --create-ek-cert` signs with), unless a test says otherwise.
        attestation = dict(attestation or {})
        if "ek_ca_certificates" not in attestation and not attestation.get("accept_uncertified_eks"):
            attestation["ek_ca_certificates"] = swtpm_localca_files()
        cfg += "\n[attestation]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in attestation.items())
        # The agent measures the booted slot into PCR 23 (or 16): a testbed's PCR,
        # which software can reset, so every class here is declared a testbed.
        cfg += TESTBED_MEASUREMENT if measurement is None else measurement
        # The online director key `outpost director init` named (made offline; made
        # here for repositories that never ran it, which then have no director).
        self.director_key = repo.key("director")
        if "[director]" not in extra_toml:
            cfg += f"\n[director]\nkey = {toml_str(self.director_key)}\n"
        cfg += extra_toml
        if tls:
            cfg += f"\n[tls]\ncertificate = {toml_str(tls.chain)}\nkey = {toml_str(tls.key)}\n"
        tomllib.loads(cfg)
        self.config.write_text(cfg)
        self.log = base / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._logf = None

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "repository" / "staging"

    @property
    def metadata_dir(self) -> Path:
        return self.data_dir / "repository" / "metadata"

    def token(self, name: str = "ci", role: str = "pipeline") -> str:
        res = assert_ok(run([self.exe, "--config", self.config, "token", "create",
                             "--role", role, "--name", name]))
        return parse_token(res.stdout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, allow_exit: bool = False, until_log: str | None = None) -> bool:
        """Start `serve` and wait for GET /healthz (or, with until_log, for that text in
        its log). If the process exits first: fail the test, or with allow_exit return
        False (its exit code in self.proc)."""
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([str(self.exe), "--config", str(self.config), "serve"],
                                     stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._logf.close()
                self._logf = None
                if allow_exit:
                    return False
                pytest.fail(f"outpost-server exited with {self.proc.returncode}:\n"
                            f"{self.log_text()[-3000:]}", pytrace=False)
            if until_log is not None:
                if until_log in self.log_text():
                    return True
                time.sleep(0.1)
                continue
            try:
                status, _ = self.get("/healthz", timeout=1)
                if status == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail("outpost-server did not answer GET /healthz within 20s:\n"
                    + self.log_text()[-3000:], pytrace=False)

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET over this server's transport (with TLS: verified against the test's CA)."""
        return http_get(f"{self.url}{path}", timeout=timeout, context=self.tls.client_context() if self.tls else None)

    def terminate(self, timeout: float = 10) -> int | None:
        """SIGTERM and wait up to `timeout` s; the exit code, or None if it did not exit
        (then it is killed)."""
        assert self.proc is not None
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        else:
            code = self.proc.returncode
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        return code

    def stop(self) -> None:
        if self.proc is not None:
            self.terminate()

    def metadata(self, name: str) -> tuple[int, bytes]:
        return http_get(f"{self.url}/metadata/{name}")


class Agent:
    """`outpost-agent --config agent.toml update` with a config written next to its
    state: paths in the config are relative (to the config file), as the docs allow."""

    def __init__(self, workdir: Path, server_url: str, trusted_root: bytes,
                 hardware_class: str = "rpi4", timeout: str | None = "10s",
                 extra_toml: str = "") -> None:
        self.exe = binary("outpost-agent")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "provisioned-root.json").write_bytes(trusted_root)
        self.config = workdir / "agent.toml"
        self.state_dir = workdir / "state"
        text = (f"server_url = {toml_str(server_url)}\n"
                f"hardware_class = {toml_str(hardware_class)}\n"
                'state_dir = "state"\n'
                'trusted_root = "provisioned-root.json"\n'
                f"{extra_toml}")
        if timeout is not None:
            text += f"\n[http]\ntimeout = {toml_str(timeout)}\n"
        tomllib.loads(text)
        self.config.write_text(text)

    @property
    def downloads(self) -> Path:
        return self.state_dir / "downloads"

    def update(self, *, as_json: bool = True, **kw) -> Result:
        argv = [self.exe, "--config", self.config, "update"]
        if as_json:
            argv.append("--json")
        return run(argv, **kw)

    @staticmethod
    def report(res: Result) -> dict:
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            pytest.fail("`update --json` stdout is not JSON\n" + res.describe(), pytrace=False)
        assert isinstance(doc, dict), res.describe()
        return doc

    def download_files(self) -> dict[str, bytes]:
        """Every file under state_dir/downloads (partial/hidden files included)."""
        return tree_files(self.downloads)

    def stored(self, target_path: str) -> bytes | None:
        p = self.downloads / quote_all(target_path)
        return p.read_bytes() if p.exists() else None


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


@pytest.fixture
def outpost_repo(tmp_path) -> OutpostRepo:
    """`outpost repo init` (3 root keys, threshold 2, local online keys), a
    `firmware` role delegated firmware/rpi4/*/*, and director root v1 (offline key
    `director-root`, online key `director`) signed into the targets role."""
    repo = OutpostRepo(tmp_path / "signer")
    repo.init()
    repo.delegate_firmware()
    repo.director_init()
    return repo


@pytest.fixture
def server_factory(tmp_path):
    """Factory: server_factory(repo, name="server", **repository_settings) -> a started
    OutpostServer and a pipeline token (stopped after the test)."""
    servers: list[OutpostServer] = []

    def factory(repo: OutpostRepo, name: str = "server", attestation: dict | None = None,
                **repository) -> tuple[OutpostServer, str]:
        server = OutpostServer(tmp_path, repo, name=name, repository=repository,
                               attestation=attestation)
        servers.append(server)
        token = server.token()
        server.start()
        return server, token

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def outpost_server(server_factory, outpost_repo):
    return server_factory(outpost_repo)


@pytest.fixture
def published(tmp_path, outpost_repo, outpost_server):
    """Server running, repository pushed, firmware 1.0.0 for rpi4 published."""
    server, token = outpost_server
    outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url,
                     "--token", token)
    fw = tmp_path / "fw.img"
    fw.write_bytes(FW_BYTES)
    outpost_repo.cli("release", "publish", "--repo", outpost_repo.dir, "--firmware", fw,
                     "--hardware-class", "rpi4", "--version", "1.0.0",
                     "--key", outpost_repo.key("firmware"),
                     "--server", server.url, "--token", token)
    return outpost_repo, server, token


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


# ------------------------------------------ A/B installs (`outpost-agent run --once`)
def sha256_hex(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's content, None when it does not exist."""
    import hashlib
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return toml_str(v)


class Device:
    """A device: `outpost-agent --config agent.toml run --once` with the file A/B boot
    backend (state_dir/boot/slot-a.img, slot-b.img, bootenv.json) and the install
    journal (state_dir/journal.json). All paths in the config are relative to it, so
    a copy of the whole work dir (`clone`) is an independent device in the same state.

    `install` fills the [install] table (trial_attempts, trial_deadline, retries,
    bandwidth_limit_bytes_per_sec, boot_dir, ...); `health` is a list of [[health]]
    tables ({"kind": "command", "run": ..., "timeout_secs": N} and so on)."""

    def __init__(self, workdir: Path, server_url: str, trusted_root: bytes, *,
                 hardware_class: str = "rpi4", device_id: str = "device-1",
                 timeout: str = "5s", install: dict | None = None,
                 health: list[dict] | None = None, tpm: dict | None = None) -> None:
        self.exe = binary("outpost-agent")
        self.tpm = dict(tpm or {})
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "provisioned-root.json").write_bytes(trusted_root)
        self.server_url = server_url
        self.hardware_class = hardware_class
        self.device_id = device_id
        self.timeout = timeout
        self.install = dict(install or {})
        self.health = list(health or [])
        self.extra_toml = ""
        self.write_config()

    def write_config(self, **changes) -> None:
        """(Re)writes agent.toml; keyword arguments replace server_url, install, health."""
        for k, v in changes.items():
            assert k in ("server_url", "install", "health", "device_id", "timeout", "tpm", "extra_toml"), k
            setattr(self, k, v)
        text = (f"server_url = {toml_str(self.server_url)}\n"
                f"hardware_class = {toml_str(self.hardware_class)}\n"
                'state_dir = "state"\n'
                'trusted_root = "provisioned-root.json"\n'
                f"device_id = {toml_str(self.device_id)}\n"
                f"\n[http]\ntimeout = {toml_str(self.timeout)}\n")
        if self.install:
            text += "\n[install]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                               for k, v in self.install.items())
        for check in self.health:
            text += "\n[[health]]\n" + "".join(f"{k} = {_toml_value(v)}\n"
                                                for k, v in check.items())
        if self.tpm:
            text += "\n[tpm]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.tpm.items())
        text += self.extra_toml
        tomllib.loads(text)
        self.config.write_text(text)

    # ---- paths
    @property
    def config(self) -> Path:
        return self.workdir / "agent.toml"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def boot_dir(self) -> Path:
        if "boot_dir" in self.install:
            return self.workdir / self.install["boot_dir"]
        return self.state_dir / "boot"

    @property
    def downloads(self) -> Path:
        return self.state_dir / "downloads"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.json"

    @property
    def bootenv_path(self) -> Path:
        return self.boot_dir / "bootenv.json"

    def slot_path(self, slot: str) -> Path:
        return self.boot_dir / f"slot-{slot.lower()}.img"

    # ---- running
    def argv(self, as_json: bool = True, log_level: str = "info") -> list[str]:
        argv = [str(self.exe), "--config", str(self.config), "--log-level", log_level]
        if as_json:
            argv.append("--json")
        return [*argv, "run", "--once"]

    def run_once(self, as_json: bool = True, timeout: float = 60, **kw) -> Result:
        return run(self.argv(as_json), timeout=timeout, **kw)

    def start(self, as_json: bool = True, tag: str = "bg") -> "RunningAgent":
        """`run --once` in the background, in its own process group (so a SIGKILL
        "power cut" also takes the health-check commands it started)."""
        return RunningAgent(self.argv(as_json), self.workdir / f"{tag}.out", self.workdir / f"{tag}.err")

    # ---- state on disk
    def journal(self) -> dict | None:
        if not self.journal_path.exists():
            return None
        return json.loads(self.journal_path.read_bytes())

    def phase(self) -> str | None:
        j = self.journal()
        return None if j is None else j["phase"]["phase"]

    def bootenv(self) -> dict:
        return json.loads(self.bootenv_path.read_bytes())

    def active(self) -> str:
        return self.bootenv()["active"]

    def slot_sha(self, slot: str) -> str | None:
        return file_sha256(self.slot_path(slot))

    def active_sha(self) -> str | None:
        return self.slot_sha(self.active())

    def state_summary(self) -> str:
        """Journal, boot environment and slot digests, for failure messages."""
        parts = []
        for p in (self.journal_path, self.bootenv_path):
            try:
                parts.append(f"{p.name}: {p.read_text(errors='replace')[:1500]}")
            except OSError as e:
                parts.append(f"{p.name}: <{e}>")
        for s in ("A", "B"):
            parts.append(f"slot {s}: sha256 {self.slot_sha(s)}")
        return "\n".join(parts)

    def clone(self, dest: Path) -> "Device":
        """An independent device in exactly this device's state (a copy of its dir)."""
        shutil.copytree(self.workdir, dest, symlinks=True)
        twin = Device.__new__(Device)
        twin.__dict__.update(self.__dict__)
        twin.workdir = dest
        twin.install = dict(self.install)
        twin.health = list(self.health)
        return twin

    @staticmethod
    def results(res: Result) -> list[dict]:
        """The JSON result lines `run --once --json` printed (one per concluded step)."""
        out = []
        for line in res.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pytest.fail("`run --json` printed a line that is not JSON\n" + res.describe(),
                                pytrace=False)
        return out


class RunningAgent:
    """A background `outpost-agent ... run --once` (see Device.start)."""

    def __init__(self, argv: list[str], out: Path, err: Path) -> None:
        self.argv = argv
        self.out, self.err = out, err
        self._fo, self._fe = open(out, "wb"), open(err, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._fo, stderr=self._fe,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def power_cut(self) -> bool:
        """SIGKILL the agent's process group now; True if it was still running."""
        was_alive = self.proc.poll() is None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._close()
        return was_alive

    def wait(self, timeout: float = 60) -> Result:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.power_cut()
            code = -999
        else:
            try:  # reap health-check commands it left behind, if any
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._close()
        res = Result(self.argv, code, self.out.read_text(errors="replace"),
                     self.err.read_text(errors="replace"), time.monotonic() - self.started)
        _COMMAND_LOG.append(res)
        return res

    def _close(self) -> None:
        for f in (self._fo, self._fe):
            if not f.closed:
                f.close()


def _list(server: "OutpostServer", what: str, device: str | None) -> list[dict]:
    """GET /api/v1/<what> (newest first), with a viewer token (pipeline tokens only
    publish)."""
    url = f"{server.url}/api/v1/{what}" + (f"?device={device}" if device else "")
    viewer = getattr(server, "_viewer_token", None)
    if viewer is None:
        viewer = server._viewer_token = server.token("reports-viewer", role="viewer")
    status, body = http_get(url, token=viewer)
    assert status == 200, f"GET {url} answered {status}: {body[:300]!r}"
    return json.loads(body)[what]


def list_reports(server: "OutpostServer", device: str | None = None) -> list[dict]:
    """Install reports."""
    return _list(server, "reports", device)


def list_incidents(server: "OutpostServer", device: str | None = None) -> list[dict]:
    """Integrity incidents."""
    return _list(server, "incidents", device)


# ------------------------------------------------------------ HTTP proxy
@dataclasses.dataclass
class ProxyRequest:
    """One request the proxy forwarded (or answered itself)."""
    method: str
    path: str
    range: str | None
    nth: int                 # how many earlier requests had the same path
    status: int = 0
    body_length: int = 0     # bytes the answer announced
    sent: int = 0            # body bytes actually written to the client
    body: bytes | None = None     # request body as received (API requests only)
    answer: bytes | None = None   # answer body as sent (API requests only)

    @property
    def is_target(self) -> bool:
        return self.path.startswith("/targets/")


@dataclasses.dataclass
class ProxyAnswer:
    """What the proxy sends; a `rule` may change any field. `cut_after`: close the
    connection after that many body bytes (a dropped connection). `endless`: after
    `body`, keep sending filler with no Content-Length (endless data) until the client
    goes away, for at most `endless_limit` bytes or 30 s."""
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    cut_after: int | None = None
    endless: bool = False
    endless_limit: int = 256 << 20

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def set_body(self, body: bytes, status: int | None = None) -> None:
        self.body = body
        if status is not None:
            self.status = status
        self.headers = [(k, v) for k, v in self.headers if k.lower() != "content-length"]
        self.headers.append(("Content-Length", str(len(body))))


class Proxy:
    """A threaded HTTP/1.0 proxy on 127.0.0.1 in front of `upstream` (base URL).

    Every request is recorded in `requests`. `rule(req, answer)` (settable any time)
    may alter the upstream answer before it is sent: other bytes, another status, a
    connection cut after N bytes, an endless body. `intercept(req)` (settable any time) may answer a
    request itself (a ProxyAnswer) without forwarding it. `throttle` (bytes/s) paces
    target bodies."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading
        from urllib.parse import urlsplit

        self.upstream = urlsplit(upstream)
        self.requests: list[ProxyRequest] = []
        self.rule = None
        self.intercept = None
        self.request_rule = None   # request_rule(req, body) -> body to forward
        self.throttle: int | None = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def do_GET(self):  # noqa: N802
                proxy._handle(self, "GET")

            def do_POST(self):  # noqa: N802
                proxy._handle(self, "POST")

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _handle(self, h, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        with self.lock:
            nth = sum(1 for r in self.requests if r.path == h.path)
            req = ProxyRequest(method, h.path, h.headers.get("Range"), nth)
            self.requests.append(req)
        if h.path.startswith("/api/"):
            req.body = body
        request_rule = self.request_rule
        if request_rule is not None and body is not None:
            body = request_rule(req, body)
        intercept = self.intercept
        answer = intercept(req) if intercept is not None else None
        if answer is None:
            answer = self._forward(h, method, body)
        if answer.endless:
            answer.headers = [(k, v) for k, v in answer.headers if k.lower() != "content-length"]
        elif answer.header("content-length") is None:
            answer.set_body(answer.body)
        rule = self.rule
        if rule is not None:
            rule(req, answer)
        req.status = answer.status
        req.body_length = len(answer.body)
        if h.path.startswith("/api/"):
            req.answer = answer.body
        try:
            h.send_response(answer.status)
            for k, v in answer.headers:
                h.send_header(k, v)
            h.end_headers()
            limit = len(answer.body) if answer.cut_after is None else min(answer.cut_after,
                                                                          len(answer.body))
            step = 16384
            started = time.monotonic()
            pos = 0
            while pos < limit:
                chunk = answer.body[pos:min(limit, pos + step)]
                h.wfile.write(chunk)
                h.wfile.flush()
                pos += len(chunk)
                with self.lock:
                    req.sent = pos
                if self.throttle and req.is_target:
                    due = pos / self.throttle - (time.monotonic() - started)
                    if due > 0:
                        time.sleep(due)
            if answer.endless:
                filler = b" " * 65536
                deadline = time.monotonic() + 30
                while pos < answer.endless_limit and time.monotonic() < deadline:
                    h.wfile.write(filler)
                    pos += len(filler)
                    with self.lock:
                        req.sent = pos
                h.close_connection = True
            if answer.cut_after is not None:
                import socket as _socket
                h.close_connection = True
                try:
                    h.connection.shutdown(_socket.SHUT_RDWR)
                except OSError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _forward(self, h, method: str, body: bytes | None) -> ProxyAnswer:
        import http.client
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items()
                       if k.lower() in ("range", "authorization", "content-type", "user-agent",
                                        "accept")}
            conn.request(method, h.path, body=body, headers=headers)
            up = conn.getresponse()
            return ProxyAnswer(up.status, [(k, v) for k, v in up.getheaders()
                                           if k.lower() not in ("connection", "transfer-encoding",
                                                                "keep-alive")], up.read())
        finally:
            conn.close()

    def target_requests(self, contains: str = "") -> list[ProxyRequest]:
        with self.lock:
            return [r for r in self.requests if r.is_target and contains in r.path]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_factory():
    """Factory: proxy_factory(upstream_url) -> a started Proxy (stopped after the test)."""
    proxies: list[Proxy] = []

    def factory(upstream: str) -> Proxy:
        p = Proxy(upstream)
        proxies.append(p)
        return p

    yield factory
    for p in proxies:
        p.stop()


def free_port_pair() -> int:
    """A free loopback port whose successor is free too (swtpm's command and control ports)."""
    for _ in range(200):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    pytest.fail("no two consecutive free ports on 127.0.0.1", pytrace=False)


class Swtpm:
    """A software TPM 2.0: `swtpm socket --tpm2` on 127.0.0.1 (command port P, control
    port P+1), its state in `dir`. With `ek_cert`, `swtpm_setup` manufactures it first
    with an EK certificate (from swtpm's local CA) in the TPM's NV, like a real TPM."""

    def __init__(self, base: Path, name: str = "tpm", ek_cert: bool = False) -> None:
        self.dir = base / f"{name}-state"
        self.dir.mkdir(parents=True, exist_ok=True)
        if ek_cert:
            assert_ok(run(["swtpm_setup", "--tpm2", "--tpmstate", str(self.dir), "--create-ek-cert",
                           "--create-platform-cert", "--overwrite"], timeout=120))
        self.log = base / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.start()

    def start(self) -> None:
        exe = shutil.which("swtpm")
        if exe is None:
            pytest.fail("swtpm is not installed: bash scripts/setup.sh installs it", pytrace=False)
        self.port = free_port_pair()
        self.proc = subprocess.Popen(
            [exe, "socket", "--tpm2", "--tpmstate", f"dir={self.dir}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear", "--log", f"file={self.log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"swtpm exited with {self.proc.returncode} (log: {self.log})", pytrace=False)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"swtpm did not listen on port {self.port} within 10 s", pytrace=False)
                time.sleep(0.02)

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tool(self, *args: str) -> Result:
        """A tpm2-tools command against this TPM (an independent look at it)."""
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        return run(list(args), env=env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def swtpm_factory(tmp_path):
    """Factory: swtpm_factory(name, ek_cert=True) -> a running Swtpm (stopped after the test),
    manufactured with an EK certificate from swtpm's local CA, as the servers here require."""
    tpms: list[Swtpm] = []

    def factory(name: str = "tpm", ek_cert: bool = True) -> Swtpm:
        t = Swtpm(tmp_path, name, ek_cert)
        tpms.append(t)
        return t

    yield factory
    for t in tpms:
        t.stop()


@pytest.fixture
def fleet(outpost_repo, outpost_server):
    """Repository pushed to a running server: (repo, server, token). Publish with
    repo.publish(data, version, server=server, token=token, extra=(...))."""
    server, token = outpost_server
    outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url,
                     "--token", token)
    return outpost_repo, server, token
