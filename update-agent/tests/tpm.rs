//! The agent's TPM operations against real software TPMs (`swtpm socket --tpm2`, one
//! process per TPM, started here), checked with the server's pure verification code:
//! the server-side MakeCredential is opened by TPM2_ActivateCredential only in the TPM
//! that holds both keys; quotes verify under their own AK only; measured boot replays.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_agent::tpm::Tpm;
use outpost_protocol::attest::credential::make_credential;
use outpost_protocol::attest::{EventKind, EventLog, MeasurementEvent, Quote, TpmPublic};
use sha2::{Digest, Sha256};

struct Swtpm {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two consecutive free loopback ports (swtpm's command and control ports).
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = a.local_addr().expect("local addr").port();
        if port < 65535 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1");
}

/// One test at a time: libtss2's TCTI sockets are not close-on-exec, so an swtpm
/// started by one test while another holds a TPM connection inherits that socket, and
/// the other test's swtpm, which serves one connection at a time, then waits on it
/// for good (seen: a flush that never returns).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn swtpm() -> Swtpm {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port_pair();
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.path().display()))
        .args(["--server", &format!("type=tcp,port={port},bindaddr=127.0.0.1")])
        .args(["--ctrl", &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1)])
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start swtpm (apt-get install swtpm; scripts/setup.sh installs it)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "swtpm did not listen on {port} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Swtpm { child, port, _dir: dir }
}

fn tpm(s: &Swtpm) -> Tpm {
    Tpm::new(&format!("swtpm:host=127.0.0.1,port={}", s.port)).expect("TCTI")
}

#[test]
fn credential_opens_only_in_the_tpm_holding_both_keys() {
    let _serial = one_at_a_time();
    let (s1, s2) = (swtpm(), swtpm());
    let (t1, t2) = (tpm(&s1), tpm(&s2));
    let (ek1, _) = t1.endorsement().expect("EK 1");
    let (ek2, _) = t2.endorsement().expect("EK 2");
    assert_ne!(ek1, ek2, "two TPMs, two endorsement keys");
    let ek1p = TpmPublic::parse(&ek1, "endorsement key").expect("parse EK");
    ek1p.check_endorsement_key().expect("default RSA EK accepted");
    let ak1 = t1.create_ak().expect("AK 1");
    let ak2 = t2.create_ak().expect("AK 2");
    let ak1p = TpmPublic::parse(&ak1.public, "attestation key").expect("parse AK");
    ak1p.check_attestation_key().expect("AK accepted");
    let ak2p = TpmPublic::parse(&ak2.public, "attestation key").expect("parse AK 2");

    // The honest case: EK 1 and AK 1 in TPM 1.
    let secret = [7u8; 32];
    let made = make_credential(&ek1p, &ak1p.name(), &secret).expect("make credential");
    let got = t1.activate_credential(&ak1, &made.credential_blob, &made.encrypted_secret).expect("activate in TPM 1");
    assert_eq!(got, secret.to_vec());

    // EK 1 with AK 2: TPM 2 cannot open what was sealed to EK 1 ...
    let mixed = make_credential(&ek1p, &ak2p.name(), &secret).expect("make credential");
    let err = t2.activate_credential(&ak2, &mixed.credential_blob, &mixed.encrypted_secret).expect_err("TPM 2 must not open it");
    assert!(err.to_string().contains("activate credential"), "{err}");
    // ... and TPM 1 does not hold an object with AK 2's Name: the integrity check fails.
    let err = t1.activate_credential(&ak1, &mixed.credential_blob, &mixed.encrypted_secret).expect_err("TPM 1 must not open it");
    assert!(err.to_string().contains("activate credential"), "{err}");
}

#[test]
fn quotes_verify_under_their_own_ak_and_replay_the_measured_boot() {
    let _serial = one_at_a_time();
    let (s1, s2) = (swtpm(), swtpm());
    let (t1, t2) = (tpm(&s1), tpm(&s2));
    let ak1 = t1.create_ak().expect("AK 1");
    let ak2 = t2.create_ak().expect("AK 2");
    let ak1p = TpmPublic::parse(&ak1.public, "attestation key").expect("parse");
    let ak2p = TpmPublic::parse(&ak2.public, "attestation key").expect("parse");

    let image: [u8; 32] = Sha256::digest(b"slot image").into();
    t1.measure_boot(23, &image).expect("measure");
    let log = EventLog {
        events: vec![MeasurementEvent {
            pcr: 23,
            sha256: hex::encode(image),
            event: EventKind::SlotBoot,
            slot: outpost_protocol::slot::Slot::A,
            length: 10,
            at: "2026-11-23T00:00:00Z".into(),
        }],
    };
    assert_eq!(t1.read_pcr(23).expect("read"), log.replay(23).expect("replay"));

    let nonce = [42u8; 32];
    let q = t1.quote(&ak1, &nonce, &[23]).expect("quote");
    let quote = Quote::verify(&ak1p, &q.attest, &q.signature).expect("verifies under AK 1");
    assert_eq!(quote.extra_data, nonce.to_vec());
    assert_eq!(quote.sha256_pcrs().expect("one bank"), &[23]);
    assert_eq!(quote.pcr_digest, log.pcr_digest(&[23]).expect("digest").to_vec());
    let err = Quote::verify(&ak2p, &q.attest, &q.signature).expect_err("another device's AK");
    assert!(err.to_string().contains("does not verify"), "{err}");

    // A second boot resets and measures again: the log starts over.
    let other: [u8; 32] = Sha256::digest(b"other image").into();
    t1.measure_boot(23, &other).expect("measure again");
    let q2 = t1.quote(&ak1, &nonce, &[23]).expect("quote");
    let quote2 = Quote::verify(&ak1p, &q2.attest, &q2.signature).expect("verifies");
    assert_ne!(quote2.pcr_digest, quote.pcr_digest, "the old log no longer replays");
    // One flipped bit in the attestation breaks the signature.
    let mut bad = q2.attest.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(Quote::verify(&ak1p, &bad, &q2.signature).is_err());
}

/// The TLS client key: made in the TPM, certified by the AK of the same TPM for one
/// device and one check-in, signs digests that verify with its public key, and the
/// TPM refuses to export it.
#[test]
fn the_tls_key_is_certified_by_its_own_tpms_ak_signs_and_cannot_leave() {
    let _serial = one_at_a_time();
    use outpost_protocol::attest::tlskey::{certify_qualifying_data, verify_tls_key, TlsKeyProof};
    let (s1, s2) = (swtpm(), swtpm());
    let (t1, t2) = (tpm(&s1), tpm(&s2));
    let ak1 = t1.create_ak().expect("AK 1");
    let ak2 = t2.create_ak().expect("AK 2");
    let ak1p = TpmPublic::parse(&ak1.public, "attestation key").expect("parse AK 1");
    let ak2p = TpmPublic::parse(&ak2.public, "attestation key").expect("parse AK 2");
    let key = t1.create_tls_key().expect("TLS key");
    let keyp = TpmPublic::parse(&key.public, "TLS client key").expect("parse TLS key");
    keyp.check_tls_client_key().expect("a key Outpost certifies");

    let (ek1, _) = t1.endorsement().expect("EK 1");
    let dev1 = outpost_protocol::attest::device_id(&ek1);
    let q = t1.certify(&ak1, &key, &certify_qualifying_data(&dev1, "n1")).expect("certify");
    let proof = TlsKeyProof {
        public: hex::encode(&key.public),
        attest: hex::encode(&q.attest),
        signature: hex::encode(&q.signature),
        ek_public: hex::encode(&ek1),
    };
    let resident = verify_tls_key(&ak1p, &dev1, "n1", &proof).expect("the server accepts it");
    // Another device's AK, another device id, another check-in's nonce: refused.
    assert!(verify_tls_key(&ak2p, &dev1, "n1", &proof).unwrap_err().to_string().contains("does not verify"));
    assert!(verify_tls_key(&ak1p, "dev-2", "n1", &proof).unwrap_err().to_string().contains("qualifying data"));
    assert!(verify_tls_key(&ak1p, &dev1, "n2", &proof).unwrap_err().to_string().contains("qualifying data"));
    // A certification of one key sent with another key's public area: refused.
    let other = t1.create_tls_key().expect("a second key");
    let swapped = TlsKeyProof { public: hex::encode(&other.public), ..proof.clone() };
    assert!(verify_tls_key(&ak1p, &dev1, "n1", &swapped).unwrap_err().to_string().contains("another object"));
    // Another TPM's EK sent along (its digest is another device): refused.
    let (ek2, _) = t2.endorsement().expect("EK 2");
    let foreign_ek = TlsKeyProof { ek_public: hex::encode(&ek2), ..proof.clone() };
    assert!(verify_tls_key(&ak1p, &dev1, "n1", &foreign_ek).unwrap_err().to_string().contains("not this device's"));
    // The key cannot be certified by (loaded into) another TPM: its private area is
    // wrapped by TPM 1's EK.
    assert!(t2.certify(&ak2, &key, &certify_qualifying_data("dev-1", "n1")).is_err());
    // The AK itself is restricted: it is no TLS key.
    assert!(ak1p.check_tls_client_key().unwrap_err().to_string().contains("restricted"));

    // Signatures of the key verify with the certified public key.
    let digest: [u8; 32] = Sha256::digest(b"a TLS 1.3 CertificateVerify").into();
    let (r, s) = t1.sign_digest(&key, &digest).expect("sign");
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&r);
    sig[32..].copy_from_slice(&s);
    let point = resident.public.ecc_point().expect("point");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(b"a TLS 1.3 CertificateVerify", &sig)
        .expect("the TPM's signature verifies");

    // Exporting it (TPM2_Duplicate) is refused by the TPM.
    let err = t1.try_export(&key).expect_err("the TPM must refuse to duplicate a fixedTPM/fixedParent key");
    assert!(err.to_string().contains("duplicate TLS key"), "{err}");
    eprintln!("TPM2_Duplicate of the TLS key: {err}");
}

/// Root on the device, with the device's own AK, tries to get a key certified that is
/// not the agent's TLS key under the EK:
/// - an object loaded from outside (TPM2_LoadExternal of a public area whose
///   attributes say "made here, never leaves"; with a software key's public area, a
///   certificate for it would be an exportable device credential): the TPM itself
///   refuses to certify it (no authValue: TPM_RC_AUTH_UNAVAILABLE);
/// - a key the TPM made with the same attributes but elsewhere (a primary key of the
///   endorsement hierarchy): the certification verifies under the real AK with the
///   right qualifying data, and only its qualified name gives it away; the server
///   refuses it.
#[test]
fn keys_loaded_from_outside_or_made_outside_the_ek_are_not_certified_even_by_the_real_ak() {
    let _serial = one_at_a_time();
    use outpost_protocol::attest::tlskey::{certify_qualifying_data, verify_tls_key, TlsKeyProof};
    use tss_esapi::abstraction::{ak, ek};
    use tss_esapi::handles::KeyHandle;
    use tss_esapi::interface_types::algorithm::AsymmetricAlgorithm;
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{Data, Private, Public, SignatureScheme};
    use tss_esapi::traits::{Marshall, UnMarshall};
    let s = swtpm();
    let t = tpm(&s);
    let ak_blob = t.create_ak().expect("AK");
    let akp = TpmPublic::parse(&ak_blob.public, "attestation key").expect("parse AK");
    let real = t.create_tls_key().expect("TLS key");
    let (ek_public, _) = t.endorsement().expect("EK");
    let id = outpost_protocol::attest::device_id(&ek_public);
    let qualifying = certify_qualifying_data(&id, "n1");

    let mut ctx = tss_esapi::Context::new(t.tcti().parse().expect("TCTI")).expect("context");
    let ek_handle = ctx.execute_with_nullauth_session(|c| ek::create_ek_object(c, AsymmetricAlgorithm::Rsa, None)).expect("EK");
    let ak_public = Public::unmarshall(&ak_blob.public).expect("AK public");
    let ak_handle = ak::load_ak(&mut ctx, ek_handle, None, Private::try_from(ak_blob.private.clone()).expect("AK private"), ak_public)
        .expect("load AK");
    let certify = |ctx: &mut tss_esapi::Context, object: KeyHandle| {
        ctx.execute_with_sessions((Some(AuthSession::Password), Some(AuthSession::Password), None), |c| {
            c.certify(object.into(), ak_handle, Data::try_from(qualifying.to_vec()).expect("data"), SignatureScheme::Null)
        })
    };

    let outside = ctx
        .execute_without_session(|c| c.load_external_public(Public::unmarshall(&real.public).expect("public"), Hierarchy::Owner))
        .expect("TPM2_LoadExternal of a public area");
    let refused = certify(&mut ctx, outside).expect_err("the TPM must not certify an object it has no authValue for");
    eprintln!("TPM2_Certify of a TPM2_LoadExternal object: {refused}");
    ctx.flush_context(outside.into()).expect("flush"); // the TPM holds three objects at a time

    let primary = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Endorsement, Public::unmarshall(&real.public).expect("template"), None, None, None, None)
        })
        .expect("a primary key with the TLS key's attributes");
    let (attest, signature) = certify(&mut ctx, primary.key_handle).expect("the AK certifies the primary key");
    let elsewhere = TlsKeyProof {
        public: hex::encode(primary.out_public.marshall().expect("public")),
        attest: hex::encode(attest.marshall().expect("attest")),
        signature: hex::encode(signature.marshall().expect("signature")),
        ek_public: hex::encode(&ek_public),
    };
    let err = verify_tls_key(&akp, &id, "n1", &elsewhere).expect_err("a key not under the EK must be refused");
    assert!(err.to_string().contains("not a child of this device's endorsement key"), "{err}");

    for handle in [primary.key_handle, ak_handle, ek_handle] {
        ctx.flush_context(handle.into()).expect("flush");
    }
    drop(ctx);
    // The agent's key, certified as loaded under the EK, passes.
    let q = t.certify(&ak_blob, &real, &qualifying).expect("certify");
    let proof = TlsKeyProof { public: hex::encode(&real.public), attest: hex::encode(&q.attest), signature: hex::encode(&q.signature), ..elsewhere };
    verify_tls_key(&akp, &id, "n1", &proof).expect("the real key under the EK is accepted");
}
