"""TLS on outpost-server's listener ([tls] in server.toml): real handshakes on loopback
against a private CA made here (tests/pki.py), HTTP/2 and HTTP/1.1 by ALPN, the
certificate reloaded on SIGHUP without dropping open connections, and plain HTTP only
when the configuration says so, on loopback unless it says that too."""
from __future__ import annotations

import dataclasses
import http.client
import os
import shutil
import signal
import socket
import ssl
import time
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import OutpostServer, run
from pki import issue_server, make_ca


@pytest.fixture
def pki(tmp_path):
    ca = make_ca(tmp_path / "pki")
    return ca, issue_server(ca, tmp_path / "pki", serial=1001)


def tls_server(tmp_path, repo, files) -> OutpostServer:
    server = OutpostServer(tmp_path, repo, tls=files)
    server.start()
    return server


def peer_serial(sock: ssl.SSLSocket) -> int:
    from cryptography import x509
    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)).serial_number


def wait_log(server: OutpostServer, text: str, after: int = 0, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log_text()[after:]
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the server's log within {timeout} s:\n{server.log_text()[-3000:]}")


def test_the_server_speaks_tls_with_http2_and_http1(tmp_path, outpost_repo, pki):
    _, files = pki
    server = tls_server(tmp_path, outpost_repo, files)
    try:
        status, body = server.get("/healthz")
        assert status == 200, body
        # ALPN: HTTP/2 preferred, HTTP/1.1 for clients that offer only it.
        for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
            ctx = files.client_context()
            ctx.set_alpn_protocols(offered)
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.selected_alpn_protocol() == chosen
                assert tls.version() in ("TLSv1.3", "TLSv1.2")
                assert peer_serial(tls) == files.serial
        # A real HTTP/2 exchange (curl with nghttp2), and HTTP/1.1 for the same route.
        curl = shutil.which("curl")
        if curl is None:
            pytest.fail("curl is missing: bash scripts/setup.sh installs it", pytrace=False)
        for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
            res = run([curl, "-sS", flag, "--cacert", files.ca, "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                       f"{server.url}/healthz"], timeout=20)
            assert res.returncode == 0 and res.stdout == f"{version} 200", res.describe()
        assert "TLS certificate" in server.log_text() and "serial" in server.log_text()
    finally:
        server.stop()


def test_clients_that_do_not_trust_the_servers_ca_or_speak_plain_http_get_nothing(tmp_path, outpost_repo, pki):
    _, files = pki
    server = tls_server(tmp_path, outpost_repo, files)
    try:
        other = make_ca(tmp_path / "other", name="other-ca")
        ctx = ssl.create_default_context(cafile=str(other.pem))
        with pytest.raises(ssl.SSLCertVerificationError) as e:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        # (The chain file ends with the CA's own certificate: self-signed, not trusted.)
        assert "certificate verify failed" in str(e.value), e.value
        wait_log(server, "TLS handshake failed")
        # Plain HTTP to the TLS port: no answer an HTTP client could take for one.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/healthz")
            conn.getresponse()
        conn.close()
        # A name the certificate does not carry is refused too.
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                files.client_context().wrap_socket(raw, server_hostname="updates.example.com")
    finally:
        server.stop()


def test_a_session_resumes_after_many_other_clients_have_connected(tmp_path, outpost_repo, pki):
    """Resumption is what spares a device's TPM a signature per connection: a client's
    TLS session must outlive the connections of many other clients (rustls' default
    store forgot it after about 130; the server now issues stateless tickets)."""
    _, files = pki
    server = tls_server(tmp_path, outpost_repo, files)
    try:
        def connect(ctx: ssl.SSLContext, session=None) -> tuple[ssl.SSLSession, bool]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                while tls.recv(65536):  # the answer; TLS 1.3 tickets come with it
                    pass
                return tls.session, tls.session_reused

        device = files.client_context()
        session, reused = connect(device)
        assert not reused and session is not None
        for _ in range(400):  # other clients, each a full handshake with its own context
            connect(files.client_context())
        _, reused = connect(device, session)
        assert reused, "the first client's session was forgotten after 400 other connections"
    finally:
        server.stop()


def test_a_stalled_handshake_holds_no_one_else_up_and_is_dropped(tmp_path, outpost_repo, pki):
    """Clients that connect and send nothing (or half a hello) do not stop others
    from being served, and the server drops them after its handshake time limit."""
    _, files = pki
    server = tls_server(tmp_path, outpost_repo, files)
    stalled = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            if i % 2:
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            stalled.append(s)
        began = time.monotonic()
        status, _ = server.get("/healthz")
        assert status == 200 and time.monotonic() - began < 5
        # Dropped within the 10 s limit (and a little): the stalled peers read the end.
        for s in stalled:
            s.settimeout(max(1.0, began + 20 - time.monotonic()))
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        assert time.monotonic() - began < 20
        wait_log(server, "TLS handshake not finished in time")
    finally:
        for s in stalled:
            s.close()
        server.stop()


def test_sighup_reloads_the_certificate_and_keeps_open_connections(tmp_path, outpost_repo, pki):
    ca, files = pki
    server = tls_server(tmp_path, outpost_repo, files)
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=files.client_context(), timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() and peer_serial(conn.sock) == 1001
        first_sock = conn.sock
        # The operator puts a renewed certificate (a new key too) in place and sends SIGHUP.
        renewed = issue_server(ca, tmp_path / "renewed", serial=1002)
        shutil.copyfile(renewed.chain, files.chain)
        shutil.copyfile(renewed.key, files.key)
        mark = len(server.log_text())
        server.proc.send_signal(signal.SIGHUP)
        wait_log(server, "reloaded on SIGHUP", after=mark)
        # The connection opened before is still served, on the same socket.
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() and conn.sock is first_sock
        # New handshakes get the new certificate.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                files.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert peer_serial(tls) == 1002
        conn.close()

        # Files that do not make a certificate and key are refused, with the reason, and
        # the certificate served so far stays: a key that is not the certificate's ...
        other = issue_server(ca, tmp_path / "other", serial=1003)
        shutil.copyfile(other.key, files.key)
        mark = len(server.log_text())
        server.proc.send_signal(signal.SIGHUP)
        log = wait_log(server, "keeping the TLS certificate served so far", after=mark)
        assert "does not go with the certificate" in log and str(files.key) in log, log
        # ... and a chain file with no certificate in it.
        files.chain.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        mark = len(server.log_text())
        server.proc.send_signal(signal.SIGHUP)
        log = wait_log(server, "keeping the TLS certificate served so far", after=mark)
        assert "no certificate in the file" in log and str(files.chain) in log, log
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                files.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert peer_serial(tls) == 1002
        assert server.proc.poll() is None
    finally:
        server.stop()


def rewrite(server: OutpostServer, old: str, new: str) -> None:
    text = server.config.read_text()
    assert old in text
    server.config.write_text(text.replace(old, new, 1))


def test_plain_http_only_when_configured_and_on_loopback_unless_said_so(tmp_path, outpost_repo, pki):
    _, files = pki
    # Neither [tls] nor plain_http: refused, naming both ways out.
    server = OutpostServer(tmp_path, outpost_repo, name="neither")
    rewrite(server, "plain_http = true\n", "")
    assert server.start(allow_exit=True) is False
    log = server.log_text()
    assert "no [tls]" in log and "plain_http = true" in log and str(server.config) in log, log
    # plain_http on an address beyond loopback: refused, unless said twice.
    server = OutpostServer(tmp_path, outpost_repo, name="wide")
    rewrite(server, f'listen = "127.0.0.1:{server.port}"', f'listen = "0.0.0.0:{server.port}"')
    assert server.start(allow_exit=True) is False
    log = server.log_text()
    assert "not a loopback address" in log and "plain_http_beyond_loopback" in log, log
    rewrite(server, "plain_http = true\n", "plain_http = true\nplain_http_beyond_loopback = true\n")
    server.start()
    try:
        assert "plain_http = true: no TLS on the listener" in server.log_text()
    finally:
        server.stop()
    # Both at once: refused.
    server = OutpostServer(tmp_path, outpost_repo, name="both", tls=files)
    rewrite(server, "data_dir", "plain_http = true\ndata_dir")
    assert server.start(allow_exit=True) is False
    assert "both [tls] and plain_http = true" in server.log_text(), server.log_text()


def test_bad_certificate_files_keep_the_server_from_starting_with_a_reason(tmp_path, outpost_repo, pki):
    ca, files = pki
    cases = []
    missing = tmp_path / "nowhere" / "server.pem"
    cases.append(("missing", dict(chain=missing), [str(missing), "cannot read"]))
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cases.append(("empty", dict(chain=empty), [str(empty), "no certificate"]))
    other = issue_server(ca, tmp_path / "other", serial=77)
    cases.append(("mismatch", dict(key=other.key), [str(other.key), "does not go with the certificate"]))
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    cases.append(("garbage key", dict(key=garbage), [str(garbage), "tls.key"]))
    for name, change, wants in cases:
        bad = dataclasses.replace(files, **change)
        server = OutpostServer(tmp_path, outpost_repo, name=name.replace(" ", "-"), tls=bad)
        assert server.start(allow_exit=True) is False, name
        log = server.log_text()
        for want in wants:
            assert want in log, (name, want, log)
        assert "listening" not in log, (name, log)


def test_an_expired_certificate_is_an_error_in_the_log_and_clients_refuse_it(tmp_path, outpost_repo, pki):
    ca, _ = pki
    expired = issue_server(ca, tmp_path / "expired", serial=55, valid_from=timedelta(days=-3), valid_for=timedelta(days=1))
    server = OutpostServer(tmp_path, outpost_repo, tls=expired)
    server.start(until_log="outpost-server listening")
    try:
        assert "has expired" in server.log_text(), server.log_text()
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                expired.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        server.stop()


# ------------------------------------------------------------ the clients
def test_cli_and_agent_reach_a_tls_server_through_a_private_ca_and_name_the_certificate_problem(
        tmp_path, outpost_repo, pki, monkeypatch):
    """The `outpost` CLI (--ca-file / OUTPOST_CA_FILE) and the agent ([http]
    ca_certificates) trust only the CA they are given; without one they use the system's
    trust store, which knows nothing of this CA (SSL_CERT_FILE points it at the CA, as
    an operator would put the CA in the store). A client that does not trust the server
    stops with an error that says what is wrong with the certificate."""
    from conftest import FW_BYTES, FW_PATH, Agent, assert_ok, toml_str
    _, files = pki
    server = OutpostServer(tmp_path, outpost_repo, tls=files)
    token = server.token()
    server.start()
    try:
        push = ["repo", "push", "--repo", outpost_repo.dir, "--server", server.url, "--token", token]
        # No CA given, and the system store does not know this one.
        res = outpost_repo.cli(*push, check=False)
        assert res.returncode != 0 and "certificate" in res.stderr and "UnknownIssuer" in res.stderr, res.describe()
        # Another CA given: the same refusal.
        other = make_ca(tmp_path / "other", name="other-ca")
        res = outpost_repo.cli(*push, "--ca-file", other.pem, check=False)
        assert res.returncode != 0 and "UnknownIssuer" in res.stderr, res.describe()
        # A file with no certificate in it is named.
        res = outpost_repo.cli(*push, "--ca-file", files.key, check=False)
        assert res.returncode != 0 and str(files.key) in res.stderr and "no certificate" in res.stderr, res.describe()
        # The right CA, by flag and by environment.
        assert_ok(outpost_repo.cli(*push, "--ca-file", files.ca, check=False))
        monkeypatch.setenv("OUTPOST_CA_FILE", str(files.ca))
        fw = tmp_path / "fw.img"
        fw.write_bytes(FW_BYTES)
        assert_ok(outpost_repo.cli("release", "publish", "--repo", outpost_repo.dir, "--firmware", fw, "--hardware-class", "rpi4",
                                   "--version", "1.0.0", "--key", outpost_repo.key("firmware"), "--server", server.url,
                                   "--token", token, check=False))
        monkeypatch.delenv("OUTPOST_CA_FILE")

        # The agent without a CA of its own: the system store, which refuses the server.
        bare = Agent(tmp_path / "bare", server.url, outpost_repo.root1)
        res = bare.update()
        assert res.returncode != 0 and "UnknownIssuer" in (res.stdout + res.stderr), res.describe()
        assert bare.stored(FW_PATH) is None
        # ... the same agent once the system store holds the CA.
        res = bare.update(env={**os.environ, "SSL_CERT_FILE": str(files.ca)})
        assert res.returncode == 0 and Agent.report(res).get("target") == FW_PATH, res.describe()
        # With [http] ca_certificates: only that CA.
        agent = Agent(tmp_path / "device", server.url, outpost_repo.root1, timeout=None,
                      extra_toml=f"\n[http]\ntimeout = \"10s\"\nca_certificates = {toml_str(files.ca)}\n")
        res = assert_ok(agent.update())
        assert Agent.report(res).get("target") == FW_PATH and agent.stored(FW_PATH) == FW_BYTES
        wrong = Agent(tmp_path / "wrong", server.url, outpost_repo.root1, timeout=None,
                      extra_toml=f"\n[http]\ntimeout = \"10s\"\nca_certificates = {toml_str(other.pem)}\n")
        res = wrong.update(env={**os.environ, "SSL_CERT_FILE": str(files.ca)})
        assert res.returncode != 0 and "UnknownIssuer" in (res.stdout + res.stderr), res.describe()
        empty = tmp_path / "empty-ca.pem"
        empty.write_text("")
        res = Agent(tmp_path / "empty", server.url, outpost_repo.root1, timeout=None,
                    extra_toml=f"\n[http]\nca_certificates = {toml_str(empty)}\n").update()
        assert res.returncode != 0 and str(empty) in res.stderr and "no certificate" in res.stderr, res.describe()
    finally:
        server.stop()


def test_the_fleet_simulator_enrolls_and_checks_in_over_tls_with_its_ca_file(tmp_path, outpost_repo, pki, monkeypatch):
    from conftest import assert_ok, binary
    from test_attestation import Ops, image, publish
    _, files = pki
    server = OutpostServer(tmp_path, outpost_repo, tls=files, attestation={"accept_uncertified_eks": True})
    token = server.token()
    server.start()
    try:
        monkeypatch.setenv("OUTPOST_CA_FILE", str(files.ca))  # the operator's CLI, below
        fleet = (outpost_repo, server, token)
        outpost_repo.cli("repo", "push", "--repo", outpost_repo.dir, "--server", server.url, "--token", token)
        ops = Ops(fleet)
        v1 = publish(fleet, image("v1"), "1.0.0")
        monkeypatch.delenv("OUTPOST_CA_FILE")
        sim = binary("outpost-fleet-sim")
        state = tmp_path / "fleet.json"
        enroll = [sim, "enroll", "--server", server.url, "--token", ops.token, "--devices", "3",
                  "--image-sha256", v1["sha256"], "--version", "1.0.0", "--state", state, "--ek-pool", "1"]
        res = run(enroll)
        assert res.returncode != 0 and "UnknownIssuer" in res.stderr, res.describe()
        assert_ok(run([*enroll, "--ca-file", files.ca]))
        import json
        out = json.loads(assert_ok(run([sim, "run", "--state", state, "--max-checkins", "3", "--json", "--ca-file", files.ca])).stdout)
        assert (out["checkins"], out["attested"], out["errors"]) == (3, 3, 0), out
    finally:
        server.stop()


class MtlsProxy:
    """A TLS-terminating proxy in front of a plain-HTTP server, as a load balancer that
    requires client certificates: the handshake needs a certificate from `client_ca`;
    the bytes then go to the server on loopback. Records the subjects it let in."""

    def __init__(self, files, client_ca: Path, upstream_port: int) -> None:
        import threading
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(files.chain), str(files.key))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(cafile=str(client_ca))
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.admitted: list[str] = []
        self.refused: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        import threading
        raw.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.refused.append(str(e))
            raw.close()
            return
        self.admitted.append(dict(x[0] for x in tls.getpeercert()["subject"])["commonName"])
        up = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)

        def pump(a, b) -> None:
            try:
                while chunk := a.recv(65536):
                    b.sendall(chunk)
            except OSError:
                pass
            finally:
                for sock in (a, b):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pump, args=(up, tls), daemon=True).start()
        pump(tls, up)

    def stop(self) -> None:
        self.listener.close()


def test_the_cli_presents_its_client_certificate_to_a_proxy_that_requires_one(tmp_path, outpost_repo, pki):
    """Operator tooling behind a load balancer that terminates TLS and requires client
    certificates: `outpost --client-certificate/--client-key` (or OUTPOST_CLIENT_*)
    is let in; without one, with another CA's, or with files that are not a certificate
    or key, the CLI stops and says what is wrong."""
    from pki import issue_client
    _, files = pki
    server = OutpostServer(tmp_path, outpost_repo)  # plain HTTP on loopback behind the proxy
    token = server.token()
    server.start()
    operators = make_ca(tmp_path / "operators", name="operators-ca")
    cert, key = issue_client(operators, tmp_path / "operators", name="alice")
    proxy = MtlsProxy(files, operators.pem, server.port)
    try:
        url = f"https://127.0.0.1:{proxy.port}"
        push = ["repo", "push", "--repo", outpost_repo.dir, "--server", url, "--token", token, "--ca-file", files.ca]
        # No client certificate: the proxy refuses the handshake; the CLI says so.
        res = outpost_repo.cli(*push, check=False)
        assert res.returncode != 0 and url in res.stderr, res.describe()
        assert proxy.admitted == [] and proxy.refused, proxy.refused
        # A certificate of another CA: refused too.
        rogue = make_ca(tmp_path / "rogue", name="rogue-ca")
        rogue_cert, rogue_key = issue_client(rogue, tmp_path / "rogue", name="mallory")
        res = outpost_repo.cli(*push, "--client-certificate", rogue_cert, "--client-key", rogue_key, check=False)
        assert res.returncode != 0 and proxy.admitted == [], res.describe()
        # Half an identity, or files that are not what they claim, are named.
        res = outpost_repo.cli(*push, "--client-certificate", cert, check=False)
        assert res.returncode != 0 and "--client-key" in res.stderr, res.describe()
        res = outpost_repo.cli(*push, "--client-certificate", cert, "--client-key", cert, check=False)
        assert res.returncode != 0 and "--client-key" in res.stderr and str(cert) in res.stderr and "private key" in res.stderr, res.describe()
        res = outpost_repo.cli(*push, "--client-certificate", key, "--client-key", key, check=False)
        assert res.returncode != 0 and "--client-certificate" in res.stderr and "no certificate" in res.stderr, res.describe()
        # The operator's own certificate: let in, and the push reaches the server.
        assert proxy.admitted == []
        outpost_repo.cli(*push, "--client-certificate", cert, "--client-key", key)
        assert proxy.admitted and set(proxy.admitted) == {"alice"}, proxy.admitted
        # The same from the environment.
        before = len(proxy.admitted)
        outpost_repo.cli(*push, env={**os.environ, "OUTPOST_CLIENT_CERTIFICATE": str(cert), "OUTPOST_CLIENT_KEY": str(key)})
        assert len(proxy.admitted) > before, proxy.admitted
    finally:
        proxy.stop()
        server.stop()


def test_a_device_without_a_ca_store_still_updates_over_plain_http_and_trusts_no_tls_server(tmp_path, published, pki):
    """Many devices have no system CA store (no ca-certificates package; the virtual
    device has none). The agent then trusts no TLS server, says so, and refuses one
    naming the certificate problem, while a server on plain HTTP still updates it."""
    from conftest import FW_BYTES, FW_PATH, Agent, assert_ok
    repo, server, _ = published
    no_store = {**os.environ, "SSL_CERT_FILE": str(tmp_path / "none.pem"), "SSL_CERT_DIR": str(tmp_path / "none")}
    agent = Agent(tmp_path / "device", server.url, repo.root1)
    res = assert_ok(agent.update(env=no_store))
    assert Agent.report(res).get("target") == FW_PATH and agent.stored(FW_PATH) == FW_BYTES
    assert "no CA certificates on this system" in res.stderr, res.describe()
    # The same agent against a TLS server: refused, with the reason.
    _, files = pki
    tls = OutpostServer(tmp_path, repo, name="tls", tls=files)
    tls.start()
    try:
        res = Agent(tmp_path / "device2", tls.url, repo.root1).update(env=no_store)
        assert res.returncode != 0 and "UnknownIssuer" in (res.stdout + res.stderr), res.describe()
    finally:
        tls.stop()
