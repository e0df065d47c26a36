//! The device's TPM 2.0, through `tss-esapi` and a TCTI string from the config
//! (`device:/dev/tpmrm0` on hardware, `swtpm:host=127.0.0.1,port=N` in testbeds).
//! There is no software stand-in: every operation here talks to a TPM.
//!
//! Keys: the endorsement key is the TCG default RSA-2048 EK, re-derived from the
//! endorsement seed on each use (same key every time). The attestation key is an ECC
//! P-256 restricted signing key created under the EK; its public and TPM-wrapped
//! private areas are kept in the agent's state directory and loaded when needed.
//!
//! An ESAPI context is opened per operation and operations are serialized by a
//! process-wide lock (the context needs `&mut` and swtpm serves one client at a time).

use std::sync::Mutex;

use tss_esapi::abstraction::ek::{create_ek_object, retrieve_ek_pubcert};
use tss_esapi::abstraction::{ak, AsymmetricAlgorithmSelection, KeyCustomization};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{CommandCode, SessionType};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{HashcheckTicket, Signature, SymmetricDefinitionObject};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Private, Public, SignatureScheme,
    SymmetricDefinition,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

use crate::error::{AgentError, Result};

static TPM_LOCK: Mutex<()> = Mutex::new(());

/// The attestation key as stored on the device: public area and TPM-wrapped private area.
#[derive(Debug, Clone)]
pub struct AkBlob {
    pub public: Vec<u8>,
    pub private: Vec<u8>,
}

/// A quote: marshalled `TPMS_ATTEST` and `TPMT_SIGNATURE`.
#[derive(Debug, Clone)]
pub struct QuoteBytes {
    pub attest: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A handle on the configured TPM; cheap to clone, opens a context per operation.
#[derive(Debug, Clone)]
pub struct Tpm {
    tcti: String,
}

fn tpm_err(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> AgentError {
    move |e| AgentError::Tpm { op, reason: e.to_string() }
}

fn pcr_handle(pcr: u32) -> Result<PcrHandle> {
    match pcr {
        16 => Ok(PcrHandle::Pcr16),
        23 => Ok(PcrHandle::Pcr23),
        other => Err(AgentError::Tpm { op: "select measurement PCR", reason: format!("PCR {other} is not 16 or 23 (the PCRs locality 0 may reset)") }),
    }
}

impl Tpm {
    pub fn new(tcti: &str) -> Result<Self> {
        tcti.parse::<TctiNameConf>()
            .map_err(|e| AgentError::Tpm { op: "parse TCTI", reason: format!("{tcti:?}: {e}") })?;
        Ok(Tpm { tcti: tcti.to_owned() })
    }

    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// Runs `f` with exclusive use of a fresh ESAPI context.
    fn with<T>(&self, f: impl FnOnce(&mut Context) -> Result<T>) -> Result<T> {
        let _guard = TPM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let conf: TctiNameConf = self.tcti.parse().map_err(tpm_err("parse TCTI"))?;
        let mut ctx = Context::new(conf).map_err(|e| AgentError::Tpm { op: "connect", reason: format!("{}: {e}", self.tcti) })?;
        f(&mut ctx)
    }

    fn ek(ctx: &mut Context) -> Result<KeyHandle> {
        ctx.execute_with_nullauth_session(|c| create_ek_object(c, AsymmetricAlgorithm::Rsa, None))
            .map_err(tpm_err("create endorsement key"))
    }

    /// The EK's marshalled `TPMT_PUBLIC` and its certificate, when the TPM has one.
    pub fn endorsement(&self) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let public = ctx.read_public(ek).map_err(tpm_err("read EK public"));
            let _ = ctx.flush_context(ek.into());
            let public = public?.0.marshall().map_err(tpm_err("marshal EK public"))?;
            let cert = retrieve_ek_pubcert(ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048)).ok();
            Ok((public, cert))
        })
    }

    /// Creates a new attestation key under the EK.
    pub fn create_ak(&self) -> Result<AkBlob> {
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let created = ak::create_ak(ctx, ek, HashingAlgorithm::Sha256, SignatureSchemeAlgorithm::EcDsa, None, None);
            let _ = ctx.flush_context(ek.into());
            let created = created.map_err(tpm_err("create attestation key"))?;
            Ok(AkBlob {
                public: created.out_public.marshall().map_err(tpm_err("marshal AK public"))?,
                private: created.out_private.value().to_vec(),
            })
        })
    }

    fn load_ak(ctx: &mut Context, ek: KeyHandle, blob: &AkBlob) -> Result<KeyHandle> {
        let public = Public::unmarshall(&blob.public).map_err(tpm_err("unmarshal AK public"))?;
        let private = Private::try_from(blob.private.clone()).map_err(tpm_err("read AK private"))?;
        ak::load_ak(ctx, ek, None, private, public).map_err(tpm_err("load attestation key"))
    }

    /// TPM2_ActivateCredential: recovers the server's secret, which only works when
    /// this TPM holds both the EK and the attestation key the credential names.
    pub fn activate_credential(&self, blob: &AkBlob, credential_blob: &[u8], encrypted_secret: &[u8]) -> Result<Vec<u8>> {
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let result = (|| {
                let ak = Self::load_ak(ctx, ek, blob)?;
                let out = (|| {
                    let id = IdObject::try_from(credential_blob.to_vec()).map_err(tpm_err("read credential blob"))?;
                    let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(tpm_err("read encrypted secret"))?;
                    let (attrs, mask) = SessionAttributesBuilder::new().build();
                    let hmac = ctx
                        .start_auth_session(None, None, None, SessionType::Hmac, SymmetricDefinition::AES_128_CFB, HashingAlgorithm::Sha256)
                        .map_err(tpm_err("start HMAC session"))?
                        .ok_or_else(|| AgentError::Tpm { op: "start HMAC session", reason: "no session returned".into() })?;
                    ctx.tr_sess_set_attributes(hmac, attrs, mask).map_err(tpm_err("set session attributes"))?;
                    let policy = ctx
                        .start_auth_session(None, None, None, SessionType::Policy, SymmetricDefinition::AES_128_CFB, HashingAlgorithm::Sha256)
                        .map_err(tpm_err("start policy session"))?
                        .ok_or_else(|| AgentError::Tpm { op: "start policy session", reason: "no session returned".into() })?;
                    ctx.tr_sess_set_attributes(policy, attrs, mask).map_err(tpm_err("set session attributes"))?;
                    let policy_session = PolicySession::try_from(policy).map_err(tpm_err("policy session"))?;
                    ctx.execute_with_session(Some(hmac), |c| {
                        c.policy_secret(policy_session, AuthHandle::Endorsement, Default::default(), Default::default(), Default::default(), None)
                    })
                    .map_err(tpm_err("satisfy EK policy"))?;
                    ctx.set_sessions((Some(hmac), Some(policy), None));
                    let r = ctx.activate_credential(ak, ek, id, secret).map_err(tpm_err("activate credential"));
                    ctx.clear_sessions();
                    let _ = ctx.flush_context(SessionHandle::from(hmac).into());
                    let _ = ctx.flush_context(SessionHandle::from(policy).into());
                    r
                })();
                let _ = ctx.flush_context(ak.into());
                out
            })();
            let _ = ctx.flush_context(ek.into());
            Ok(result?.value().to_vec())
        })
    }

    /// TPM2_Quote over `pcrs` of the SHA-256 bank with `qualifying` as extra data.
    pub fn quote(&self, blob: &AkBlob, qualifying: &[u8], pcrs: &[u32]) -> Result<QuoteBytes> {
        let slots = pcrs
            .iter()
            .map(|p| PcrSlot::try_from(1u32 << p).map_err(tpm_err("select PCR")))
            .collect::<Result<Vec<_>>>()?;
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let result = (|| {
                let ak = Self::load_ak(ctx, ek, blob)?;
                let selection = PcrSelectionListBuilder::new()
                    .with_selection(HashingAlgorithm::Sha256, &slots)
                    .build()
                    .map_err(tpm_err("build PCR selection"));
                let out = selection.and_then(|sel| {
                    let data = Data::try_from(qualifying.to_vec()).map_err(tpm_err("qualifying data"))?;
                    ctx.execute_with_nullauth_session(|c| c.quote(ak, data, SignatureScheme::Null, sel)).map_err(tpm_err("quote"))
                });
                let _ = ctx.flush_context(ak.into());
                let (attest, signature) = out?;
                Ok(QuoteBytes {
                    attest: attest.marshall().map_err(tpm_err("marshal quote"))?,
                    signature: signature.marshall().map_err(tpm_err("marshal signature"))?,
                })
            })();
            let _ = ctx.flush_context(ek.into());
            result
        })
    }

    /// Creates the device's TLS client key under the EK: an ECDSA P-256 signing key
    /// made inside the TPM (`sensitiveDataOrigin`) that can never leave it (`fixedTPM`,
    /// `fixedParent`), not restricted, so it signs digests the TPM did not make
    /// (handshakes). Its private area exists only wrapped by the EK.
    pub fn create_tls_key(&self) -> Result<AkBlob> {
        /// The AK's template with `restricted` cleared.
        struct Unrestricted;
        impl KeyCustomization for Unrestricted {
            fn attributes(&self, builder: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
                builder.with_restricted(false)
            }
        }
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let created = ak::create_ak_2(
                ctx,
                ek,
                HashingAlgorithm::Sha256,
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
                None,
                Unrestricted,
            );
            let _ = ctx.flush_context(ek.into());
            let created = created.map_err(tpm_err("create TLS client key"))?;
            Ok(AkBlob {
                public: created.out_public.marshall().map_err(tpm_err("marshal TLS key public"))?,
                private: created.out_private.value().to_vec(),
            })
        })
    }

    /// TPM2_Certify: the AK signs that `key` is loaded in this TPM, with `qualifying`
    /// as extra data. Returns the marshalled `TPMS_ATTEST` and `TPMT_SIGNATURE`.
    pub fn certify(&self, ak_blob: &AkBlob, key: &AkBlob, qualifying: &[u8]) -> Result<QuoteBytes> {
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let result = (|| {
                let ak = Self::load_ak(ctx, ek, ak_blob)?;
                let out = Self::load_ak(ctx, ek, key).and_then(|k| {
                    let data = Data::try_from(qualifying.to_vec()).map_err(tpm_err("qualifying data"));
                    let r = data.and_then(|data| {
                        ctx.execute_with_sessions((Some(AuthSession::Password), Some(AuthSession::Password), None), |c| {
                            c.certify(k.into(), ak, data, SignatureScheme::Null)
                        })
                        .map_err(tpm_err("certify TLS key"))
                    });
                    let _ = ctx.flush_context(k.into());
                    r
                });
                let _ = ctx.flush_context(ak.into());
                let (attest, signature) = out?;
                Ok(QuoteBytes {
                    attest: attest.marshall().map_err(tpm_err("marshal certification"))?,
                    signature: signature.marshall().map_err(tpm_err("marshal signature"))?,
                })
            })();
            let _ = ctx.flush_context(ek.into());
            result
        })
    }

    /// TPM2_Sign of a SHA-256 `digest` with the TLS key: the ECDSA signature's r and s,
    /// each 32 bytes.
    pub fn sign_digest(&self, key: &AkBlob, digest: &[u8; 32]) -> Result<([u8; 32], [u8; 32])> {
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let result = Self::load_ak(ctx, ek, key).and_then(|k| {
                let r = (|| {
                    let ticket = TPMT_TK_HASHCHECK { tag: TPM2_ST_HASHCHECK, hierarchy: TPM2_RH_NULL, digest: Default::default() };
                    let validation = HashcheckTicket::try_from(ticket).map_err(tpm_err("null hash-check ticket"))?;
                    let digest = Digest::try_from(digest.to_vec()).map_err(tpm_err("digest"))?;
                    ctx.execute_with_session(Some(AuthSession::Password), |c| c.sign(k, digest, SignatureScheme::Null, validation))
                        .map_err(tpm_err("sign with TLS key"))
                })();
                let _ = ctx.flush_context(k.into());
                r
            });
            let _ = ctx.flush_context(ek.into());
            match result? {
                Signature::EcDsa(e) => {
                    let pad = |v: &[u8]| -> Result<[u8; 32]> {
                        let mut out = [0u8; 32];
                        if v.len() > 32 {
                            return Err(AgentError::Tpm { op: "sign with TLS key", reason: format!("a {}-byte ECDSA component", v.len()) });
                        }
                        out[32 - v.len()..].copy_from_slice(v);
                        Ok(out)
                    };
                    Ok((pad(e.signature_r().value())?, pad(e.signature_s().value())?))
                }
                other => Err(AgentError::Tpm { op: "sign with TLS key", reason: format!("the TPM made a {:?} signature, not ECDSA", other.algorithm()) }),
            }
        })
    }

    /// TPM2_Duplicate of `key` (unwrapped, to no new parent), under a policy session
    /// that allows duplication: what exporting the key would take. The TPM refuses a
    /// key with `fixedTPM` and `fixedParent`; `Err` carries what it said.
    pub fn try_export(&self, key: &AkBlob) -> Result<()> {
        self.with(|ctx| {
            let ek = Self::ek(ctx)?;
            let result = Self::load_ak(ctx, ek, key).and_then(|k| {
                let r = (|| {
                    let policy = ctx
                        .start_auth_session(None, None, None, SessionType::Policy, SymmetricDefinition::AES_128_CFB, HashingAlgorithm::Sha256)
                        .map_err(tpm_err("start policy session"))?
                        .ok_or_else(|| AgentError::Tpm { op: "start policy session", reason: "no session returned".into() })?;
                    let session = PolicySession::try_from(policy).map_err(tpm_err("policy session"));
                    let out = session.and_then(|s| {
                        ctx.policy_command_code(s, CommandCode::Duplicate).map_err(tpm_err("policy command code"))?;
                        ctx.execute_with_session(Some(policy), |c| c.duplicate(k.into(), ObjectHandle::Null, None, SymmetricDefinitionObject::Null))
                            .map_err(tpm_err("duplicate TLS key"))
                    });
                    let _ = ctx.flush_context(SessionHandle::from(policy).into());
                    out.map(|_| ())
                })();
                let _ = ctx.flush_context(k.into());
                r
            });
            let _ = ctx.flush_context(ek.into());
            result
        })
    }

    /// The boot step's measurement, as a platform reset followed by the bootloader's
    /// extend would leave it: the measurement PCR reset to zero, then `digest` extended.
    pub fn measure_boot(&self, pcr: u32, digest: &[u8; 32]) -> Result<()> {
        let handle = pcr_handle(pcr)?;
        self.with(|ctx| {
            ctx.execute_with_nullauth_session(|c| c.pcr_reset(handle)).map_err(tpm_err("reset measurement PCR"))?;
            let mut values = DigestValues::new();
            values.set(HashingAlgorithm::Sha256, Digest::try_from(digest.to_vec()).map_err(tpm_err("digest"))?);
            ctx.execute_with_nullauth_session(|c| c.pcr_extend(handle, values)).map_err(tpm_err("extend measurement PCR"))
        })
    }

    /// The current SHA-256 value of `pcr`.
    pub fn read_pcr(&self, pcr: u32) -> Result<[u8; 32]> {
        let slot = PcrSlot::try_from(1u32 << pcr).map_err(tpm_err("select PCR"))?;
        self.with(|ctx| {
            let sel = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &[slot])
                .build()
                .map_err(tpm_err("build PCR selection"))?;
            let (_, _, digests) = ctx.execute_without_session(|c| c.pcr_read(sel)).map_err(tpm_err("read PCR"))?;
            let d = digests
                .value()
                .first()
                .ok_or_else(|| AgentError::Tpm { op: "read PCR", reason: format!("the TPM returned no value for PCR {pcr}") })?;
            <[u8; 32]>::try_from(d.clone()).map_err(tpm_err("read PCR"))
        })
    }
}
