"""Mutual TLS with device keys in the TPM (issue 19): the server's device CA
(`outpost-server device-ca init`, `[device_ca]`) issues short-lived client certificates
only in the answer to an attested check-in, for a TLS key the device's TPM made and
certified with its attestation key; the agent presents it in handshakes signed by the
TPM; device routes refuse other devices' certificates, expired ones, other CAs' and
none at all (but for the TPM-proven renewal path), and a quarantined device's access
ends within one lifetime. Real TLS on loopback, swtpm, the real agent and server."""
from __future__ import annotations

import datetime
import json
import shutil
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import OutpostServer, assert_ok, binary, run, sha256_hex, toml_str
from pki import issue_server, make_ca
from test_attestation import Ops, agent, checkin, enrolled_device, image, publish, results

TRUST_DOMAIN = "fleet.test"


class MtlsFleet:
    """A TLS server with a device CA, its repository pushed; the test process (and the
    agents and CLIs it starts) trust the server's CA through SSL_CERT_FILE."""

    def __init__(self, tmp_path: Path, repo, monkeypatch, *, lifetime: str = "1h", short: bool = False,
                 targets_require: bool = False) -> None:
        self.ca = make_ca(tmp_path / "pki")
        self.files = issue_server(self.ca, tmp_path / "pki", serial=2001)
        self.device_ca = tmp_path / "device-ca"
        assert_ok(run([binary("outpost-server"), "device-ca", "init", "--trust-domain", TRUST_DOMAIN,
                       "--out", self.device_ca]))
        assert (self.device_ca / "ca.key").stat().st_mode & 0o077 == 0, "the CA key is its owner's only"
        extra = (f"\n[device_ca]\ncertificate = {toml_str(self.device_ca / 'ca.pem')}\n"
                 f"key = {toml_str(self.device_ca / 'ca.key')}\ntrust_domain = \"{TRUST_DOMAIN}\"\n"
                 f"lifetime = \"{lifetime}\"\n"
                 + ("testbed_short_lifetime = true\n" if short else "")
                 + ("targets_require_client_certificate = true\n" if targets_require else ""))
        monkeypatch.setenv("SSL_CERT_FILE", str(self.files.ca))
        self.server = OutpostServer(tmp_path, repo, tls=self.files, extra_toml=extra)
        self.token = self.server.token()
        self.server.start()
        repo.cli("repo", "push", "--repo", repo.dir, "--server", self.server.url, "--token", self.token)
        self.fleet = (repo, self.server, self.token)
        self.ops = Ops(self.fleet)

    def issued(self) -> int:
        return self.server.log_text().count("client certificate issued")

    def forge(self, tmp_path: Path, name: str, *, device_id: str, valid_from: datetime.timedelta = datetime.timedelta(minutes=-1),
              valid_for: datetime.timedelta = datetime.timedelta(hours=1), signer: tuple | None = None) -> tuple[Path, Path]:
        """A client certificate and key made here (not in a TPM), signed by the device
        CA's key (or `signer`: (certificate, key) of another CA)."""
        if signer is None:
            ca_cert = x509.load_pem_x509_certificate((self.device_ca / "ca.pem").read_bytes())
            ca_key = serialization.load_pem_private_key((self.device_ca / "ca.key").read_bytes(), None)
        else:
            ca_cert, ca_key = signer
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now + valid_from).not_valid_after(now + valid_from + valid_for)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                    f"spiffe://{TRUST_DOMAIN}/device/{device_id}")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        c, k = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return c, k

    def post(self, path: str, body: dict, cert: tuple[Path, Path] | None = None, token: str | None = None) -> tuple[int, dict]:
        ctx = self.files.client_context()
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"{self.server.url}{path}", data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def read(self, path: str, token: str | None) -> tuple[int, str, str]:
        """GET `path` with a bearer token: status, content type, body."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(f"{self.server.url}{path}", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.files.client_context()) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    def metrics(self) -> dict[str, int]:
        """GET /metrics (operator token): each sample line as name{labels} -> value."""
        status, kind, body = self.read("/metrics", self.ops.token)
        assert status == 200 and kind.startswith("text/plain; version=0.0.4"), (status, kind, body)
        return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line and not line.startswith("#")}

    def get(self, path: str, cert: tuple[Path, Path] | None = None) -> int:
        ctx = self.files.client_context()
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        try:
            with urllib.request.urlopen(f"{self.server.url}{path}", timeout=10, context=ctx) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


@pytest.fixture
def mtls(tmp_path, outpost_repo, monkeypatch):
    made: list[MtlsFleet] = []

    def factory(**kw) -> MtlsFleet:
        m = MtlsFleet(tmp_path, outpost_repo, monkeypatch, **kw)
        made.append(m)
        return m

    yield factory
    for m in made:
        m.server.stop()


# A check-in body that parses but proves nothing: what reaches the access check.
def empty_checkin(device_id: str) -> dict:
    return {"report": {"device_id": device_id}, "attest": "00", "signature": "00"}


def tpm_point(public_hex: str) -> tuple[int, int]:
    """The P-256 point at the end of a marshalled TPMT_PUBLIC (two TPM2B of 32 bytes)."""
    b = bytes.fromhex(public_hex)
    assert b[-68:-66] == b"\x00\x20" and b[-34:-32] == b"\x00\x20", "32-byte coordinates"
    return int.from_bytes(b[-66:-34], "big"), int.from_bytes(b[-32:], "big")


def test_an_attested_device_gets_a_certificate_for_its_tpm_key_and_shakes_hands_with_it(
        tmp_path, outpost_repo, mtls, swtpm_factory):
    m = mtls()
    dev, device_id, _ = enrolled_device(m.fleet, tmp_path, m.ops, swtpm_factory)
    # The boot's attested check-in asked for a certificate and got one.
    answer = json.loads((dev.state_dir / "client-certificate.json").read_text())
    assert answer["spiffe_id"] == f"spiffe://{TRUST_DOMAIN}/device/{device_id}"
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    ca = x509.load_pem_x509_certificate((m.device_ca / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == datetime.timedelta(hours=1, minutes=1), life  # a minute's slack before, one lifetime after
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [answer["spiffe_id"]]
    assert format(cert.serial_number, "x") == answer["serial"].lstrip("0")
    # It certifies the key the TPM made: the public point in tls-key.json, whose
    # private part is there only wrapped by the TPM's EK. No private key in clear.
    key = json.loads((dev.state_dir / "tls-key.json").read_text())
    numbers = cert.public_key().public_numbers()
    assert (numbers.x, numbers.y) == tpm_point(key["public"])
    for f in dev.workdir.rglob("*"):
        if f.is_file():
            assert b"PRIVATE KEY" not in f.read_bytes(), f"a private key in clear: {f}"
    assert m.issued() == 1
    # Its expiry, for operators' alerts (node_exporter's textfile collector).
    prom = (dev.state_dir / "client-certificate.prom").read_text()
    assert f'outpost_agent_client_certificate_expiry_timestamp_seconds{{serial="{answer["serial"]}"' in prom, prom
    assert str(int(cert.not_valid_after_utc.timestamp())) in prom

    # The next check-in presents it (TPM-signed handshake): the server requires the
    # certificate for a check-in that asks for none. It asks for none (not yet past
    # half its lifetime), and none is issued.
    assert checkin(dev)["verdict"] == "attested"
    assert m.issued() == 1, m.server.log_text()[-2000:]

    # Without a certificate, a check-in that does not ask for one is refused, naming why.
    status, body = m.post(f"/api/v1/devices/{device_id}/checkin", empty_checkin(device_id))
    assert status == 401 and body["code"] == "client_certificate_required", body


def test_certificates_of_another_device_another_ca_expired_or_never_issued_are_refused(
        tmp_path, outpost_repo, mtls, swtpm_factory):
    m = mtls()
    dev, device_id, _ = enrolled_device(m.fleet, tmp_path, m.ops, swtpm_factory)
    # A genuine certificate of the device CA naming another device: it cannot act for this one.
    other = m.forge(tmp_path, "other", device_id="dev-someone-else")
    status, body = m.post(f"/api/v1/devices/{device_id}/checkin", empty_checkin(device_id), cert=other)
    assert status == 403 and body["code"] == "certificate_for_another_device", body
    assert "dev-someone-else" in body["message"] and device_id in body["message"]
    status, body = m.post(f"/api/v1/devices/{device_id}/nonce", {"request": {}, "attest": "00", "signature": "00"}, cert=other)
    assert status == 403 and body["code"] == "certificate_for_another_device", body
    # One naming this device that the CA never issued (a stolen CA key, a forged
    # store): refused like a revoked one.
    forged = m.forge(tmp_path, "forged", device_id=device_id)
    status, body = m.post(f"/api/v1/devices/{device_id}/checkin", empty_checkin(device_id), cert=forged)
    assert status == 403 and body["code"] == "certificate_revoked", body
    # Expired, or of another CA: the handshake itself fails, and the server's log
    # says why (the client gets the handshake's alert, or only the connection's end).
    def refused_in_handshake(cert: tuple[Path, Path], why: str) -> None:
        before = len(m.server.log_text())
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            m.post(f"/api/v1/devices/{device_id}/checkin", empty_checkin(device_id), cert=cert)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            log = m.server.log_text()[before:]
            if "TLS handshake failed" in log and why in log.lower().replace(" ", ""):
                return
            time.sleep(0.1)
        raise AssertionError(f"no handshake failure naming {why!r}:\n{m.server.log_text()[before:][-2000:]}")

    expired = m.forge(tmp_path, "expired", device_id=device_id, valid_from=-datetime.timedelta(hours=2),
                      valid_for=datetime.timedelta(hours=1))
    refused_in_handshake(expired, "expired")
    rogue = make_ca(tmp_path / "rogue", name="rogue-ca")
    foreign = m.forge(tmp_path, "foreign", device_id=device_id, signer=(rogue.cert, rogue.key))
    refused_in_handshake(foreign, "unknownissuer")
    # The device's own certificate still works, and operators' tokens still work
    # without one.
    assert checkin(dev)["verdict"] == "attested"
    assert m.ops.device(device_id)["device"]["attestation"] == "attested"


def test_a_quarantined_device_is_not_renewed_and_loses_access_within_one_lifetime(
        tmp_path, outpost_repo, mtls, swtpm_factory):
    lifetime = 15
    m = mtls(lifetime=f"{lifetime}s", short=True, targets_require=True)
    assert "testbed_short_lifetime" in m.server.log_text()
    v1 = publish(m.fleet, image("v1"), "1.0.0")
    bad, bad_id, _ = enrolled_device(m.fleet, tmp_path, m.ops, swtpm_factory, name="bad", v1=v1)
    good, good_id, _ = enrolled_device(m.fleet, tmp_path, m.ops, swtpm_factory, name="good", v1=v1)
    # Target files are for certificate holders: a caller with neither a certificate
    # nor a token gets none (the signed metadata stays public); the devices' own
    # downloads pass.
    assert m.get("/targets/rpi4/anything.bin") == 401
    assert m.get("/metadata/timestamp.json") == 200
    assert_ok(agent(good, "update"))

    # The bad device's slot is changed: its next check-in fails attestation.
    slot = bad.slot_path(bad.active())
    data = bytearray(slot.read_bytes())
    data[100] ^= 0xFF
    slot.write_bytes(bytes(data))
    res = bad.run_once()
    verdicts = [r for r in results(res) if "verdict" in r]
    assert verdicts and verdicts[0]["quarantined"], res.describe()
    quarantined_at = time.monotonic()
    issued_bad = json.loads((bad.state_dir / "client-certificate.json").read_text())

    # Within one lifetime of the quarantine its access ends, and no check-in renews it.
    deadline = quarantined_at + lifetime + 20
    refused = None
    while time.monotonic() < deadline:
        time.sleep(3)
        res = agent(bad, "checkin")
        shutil.rmtree(bad.downloads, ignore_errors=True)  # a real download each time
        up = agent(bad, "update")
        if up.returncode != 0:
            refused = up
            break
    assert refused is not None, "the quarantined device still reached the repository after its certificate's lifetime"
    assert time.monotonic() - quarantined_at <= lifetime + 20
    assert "client_certificate_required" in refused.stdout + refused.stderr or "401" in refused.stdout + refused.stderr, refused.describe()
    assert json.loads((bad.state_dir / "client-certificate.json").read_text())["serial"] == issued_bad["serial"], "never renewed"
    assert "not issued: the device is quarantined" in m.server.log_text()

    # The healthy device meanwhile renews at half its lifetime and keeps its access.
    before = json.loads((good.state_dir / "client-certificate.json").read_text())["serial"]
    assert checkin(good)["verdict"] == "attested"
    assert json.loads((good.state_dir / "client-certificate.json").read_text())["serial"] != before
    assert_ok(agent(good, "update"))

    # Offline past its certificate's expiry, a healthy device renews at its next
    # attested check-in (run --once checks in before it refreshes).
    time.sleep(lifetime + 1)
    res = good.run_once()
    assert res.returncode == 0, res.describe()
    after = json.loads((good.state_dir / "client-certificate.json").read_text())
    assert after["serial"] != before


def peer_check(dev, pem: Path) -> tuple[int, dict]:
    res = agent(dev, "peer", "check", "--certificate", str(pem))
    return res.returncode, json.loads(res.stdout.splitlines()[0]) if res.stdout.strip() else {"stderr": res.stderr}


def test_an_operator_revokes_a_device_at_once_and_the_signed_list_names_it(tmp_path, outpost_repo, mtls, swtpm_factory):
    """Revocation ends access at once; the signed list names the serial, and another
    device that cached it while online refuses the revoked certificate with no server."""
    m = mtls()
    dev, device_id, v1 = enrolled_device(m.fleet, tmp_path, m.ops, swtpm_factory)
    peer, peer_id, _ = enrolled_device(m.fleet, tmp_path, m.ops, swtpm_factory, name="peer", v1=v1)
    issued = json.loads((dev.state_dir / "client-certificate.json").read_text())
    serial = issued["serial"]
    revoked_pem = tmp_path / "revoked.pem"
    revoked_pem.write_text(issued["certificate"])
    ca = x509.load_pem_x509_certificate((m.device_ca / "ca.pem").read_bytes())
    # The peer cached the device CA's list with its certificate: before the revocation
    # it trusts the device's certificate and names the device.
    assert (peer.state_dir / "device-ca.crl").exists()
    code, verdict = peer_check(peer, revoked_pem)
    assert code == 0 and verdict["trusted"] and verdict["device_id"] == device_id, verdict

    def crl() -> x509.CertificateRevocationList:
        ctx = m.files.client_context()
        with urllib.request.urlopen(f"{m.server.url}/api/v1/device-ca/crl", timeout=10, context=ctx) as r:
            assert r.headers["Content-Type"] == "application/pkix-crl"
            listed = x509.load_der_x509_crl(r.read())
        assert listed.is_signature_valid(ca.public_key()), "the list is signed by the device CA"
        return listed

    assert list(crl()) == []
    # Only operators revoke.
    status, body = m.post(f"/api/v1/devices/{device_id}/certificates/revoke", {"reason": "stolen"})
    assert status == 401, body
    status, body = m.post(f"/api/v1/devices/{device_id}/certificates/revoke", {"reason": "stolen"}, token=m.ops.token)
    assert status == 200 and body == {"device_id": device_id, "revoked": 1}, body
    assert [format(r.serial_number, "x") for r in crl()] == [serial.lstrip("0")]
    # The device's certificate is refused at once, though it has not expired; its
    # agent drops it, and the TPM-proven way without one is closed to it too.
    res = agent(dev, "checkin")
    assert res.returncode != 0 and "revoked" in res.stdout + res.stderr, res.describe()
    assert not (dev.state_dir / "client-certificate.json").exists(), "the refused certificate is dropped"
    res = agent(dev, "checkin")
    assert res.returncode != 0 and "stolen" in res.stdout + res.stderr, res.describe()
    assert not (dev.state_dir / "client-certificate.json").exists()
    # Allowed again: the next check-in gets a new certificate.
    status, _ = m.post(f"/api/v1/devices/{device_id}/certificates/allow", {}, token=m.ops.token)
    assert status == 204
    assert checkin(dev)["verdict"] == "attested"
    assert json.loads((dev.state_dir / "client-certificate.json").read_text())["serial"] != serial

    # The peer's next check-in refreshes its list; then, with the server gone, it
    # refuses the revoked certificate and still trusts the device's new one.
    assert checkin(peer)["verdict"] == "attested"
    renewed_pem = tmp_path / "renewed.pem"
    renewed = json.loads((dev.state_dir / "client-certificate.json").read_text())
    renewed_pem.write_text(renewed["certificate"])

    # A replayed older list does not replace a newer one. Mirrored here: the peer's
    # cache holds a list the device CA signed with a number from the future, so the
    # server's current list is the older one; the check-in says so and keeps the cache.
    ca_key = serialization.load_pem_private_key((m.device_ca / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    future_number = 10 ** 15
    revoked_entry = x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now).build()
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    future = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
              .next_update(now + datetime.timedelta(hours=1)).add_revoked_certificate(revoked_entry)
              .add_extension(x509.CRLNumber(future_number), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
              .sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    crl_file = peer.state_dir / "device-ca.crl"
    crl_file.write_bytes(future)
    res = agent(peer, "checkin")
    assert res.returncode == 0, res.describe()
    assert "revocation list refused" in res.stderr and f"than the one cached (number {future_number}" in res.stderr, res.describe()
    assert crl_file.read_bytes() == future, "the newer cached list stays"

    # Operators see the horizons: the device CA's own expiry, each device's newest
    # unrevoked certificate's, the revoked count; /metrics is not public.
    status, _, body = m.read("/metrics", None)
    assert status == 401, body
    samples = m.metrics()
    not_after = lambda pem: int(x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc.timestamp())
    assert samples["outpost_device_ca_certificate_expiry_timestamp_seconds"] == int(ca.not_valid_after_utc.timestamp())
    assert samples[f'outpost_device_client_certificate_expiry_timestamp_seconds{{device_id="{device_id}"}}'] == not_after(renewed["certificate"])
    peer_cert = json.loads((peer.state_dir / "client-certificate.json").read_text())["certificate"]
    assert samples[f'outpost_device_client_certificate_expiry_timestamp_seconds{{device_id="{peer_id}"}}'] == not_after(peer_cert)
    assert samples["outpost_device_certificates_revoked"] == 1
    assert samples["outpost_device_certificate_lifetime_seconds"] == 3600
    # And `device show` lists the device's certificates, the revoked one with why.
    show = lambda *a: outpost_repo.cli(*a, "device", "show", device_id, "--server", m.server.url, "--token", m.ops.token)
    shown = json.loads(show("--json").stdout)["certificates"]
    assert [c["serial"] for c in shown] == [renewed["serial"], serial], shown
    assert shown[1]["revoked_reason"] == "stolen" and shown[0]["revoked_at"] is None, shown
    text = show().stdout
    assert f"{serial} issued" in text and "REVOKED" in text and "stolen" in text, text
    m.server.stop()
    code, verdict = peer_check(peer, revoked_pem)
    assert code != 0 and not verdict["trusted"] and "revoked" in verdict["reason"], verdict
    assert verdict["serial"].lstrip("0") == serial.lstrip("0") and verdict["revocation_list"]["stale"] is False, verdict
    assert int(verdict["revocation_list"]["number"]) == future_number, verdict
    code, verdict = peer_check(peer, renewed_pem)
    assert code == 0 and verdict["trusted"] and verdict["device_id"] == device_id, verdict
    # A certificate of another CA, and a tampered cached list, are refused by name.
    rogue = make_ca(tmp_path / "rogue", name="rogue-ca")
    forged = m.forge(tmp_path, "forged", device_id=peer_id, signer=(rogue.cert, rogue.key))[0]
    code, verdict = peer_check(peer, forged)
    assert code != 0 and not verdict["trusted"] and "UnknownIssuer" in verdict["reason"], verdict
    expired = m.forge(tmp_path, "expired", device_id=device_id, valid_from=datetime.timedelta(hours=-3))[0]
    code, verdict = peer_check(peer, expired)
    assert code != 0 and not verdict["trusted"] and "Expired" in verdict["reason"], verdict
    data = bytearray(crl_file.read_bytes())
    data[-10] ^= 0x01  # inside the signature
    crl_file.write_bytes(bytes(data))
    res = agent(peer, "peer", "check", "--certificate", str(renewed_pem))
    assert res.returncode != 0 and str(crl_file) in res.stderr and "signature" in res.stderr, res.describe()
