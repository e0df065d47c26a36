//! The TPM 2.0 wire structures a device sends to the server, parsed without a TPM:
//! `TPMT_PUBLIC` (EK and AK), `TPMS_ATTEST` (a quote) and `TPMT_SIGNATURE`, all in
//! the TPM's big-endian marshalling (TPM 2.0 Part 2). Only what Outpost accepts is
//! understood: RSA-2048 and NIST P-256 keys with SHA-256 names, ECDSA-SHA256 quotes.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const ALG_RSA: u16 = 0x0001;
pub const ALG_AES: u16 = 0x0006;
pub const ALG_SHA256: u16 = 0x000B;
pub const ALG_NULL: u16 = 0x0010;
pub const ALG_ECDSA: u16 = 0x0018;
pub const ALG_ECC: u16 = 0x0023;
pub const ALG_CFB: u16 = 0x0043;
pub const ECC_NIST_P256: u16 = 0x0003;
const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;

/// `TPMA_OBJECT` bits.
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}

fn bad(what: &str, reason: impl Into<String>) -> Error {
    Error::Tpm { what: what.to_owned(), reason: reason.into() }
}

/// A cursor over marshalled bytes; every short read names the structure and field.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(bad(self.what, format!("truncated at {field} (offset {}, {} of {n} bytes left)", self.pos, self.buf.len() - self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A `TPM2B_*`: a 16-bit size and that many bytes.
    fn sized(&mut self, field: &str) -> Result<&'a [u8]> {
        let n = self.u16(field)? as usize;
        self.take(n, field)
    }
    fn end(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(bad(self.what, format!("{} unexpected bytes after the structure", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

/// The key part of a `TPMT_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa {
        key_bits: u16,
        /// 0 means the default, 65537.
        exponent: u32,
        modulus: Vec<u8>,
    },
    Ecc {
        curve: u16,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC`, with the bytes it came from (its Name hashes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    pub bytes: Vec<u8>,
    pub name_alg: u16,
    pub attributes: u32,
    /// The policy digest that authorizes the object (empty: none).
    pub auth_policy: Vec<u8>,
    /// `symmetric` of a storage key: (algorithm, key bits, mode), or None for TPM_ALG_NULL.
    pub symmetric: Option<(u16, u16, u16)>,
    /// Signing scheme and its hash, or None for TPM_ALG_NULL.
    pub scheme: Option<(u16, u16)>,
    pub key: PublicKey,
}

impl TpmPublic {
    /// Parses a marshalled `TPMT_PUBLIC` (no outer size field). `what` names it in errors.
    pub fn parse(bytes: &[u8], what: &'static str) -> Result<Self> {
        let mut r = Reader::new(bytes, what);
        let kind = r.u16("type")?;
        let name_alg = r.u16("nameAlg")?;
        let attributes = r.u32("objectAttributes")?;
        let auth_policy = r.sized("authPolicy")?.to_vec();
        let symmetric = match r.u16("parameters.symmetric.algorithm")? {
            ALG_NULL => None,
            alg => {
                let bits = r.u16("parameters.symmetric.keyBits")?;
                let mode = r.u16("parameters.symmetric.mode")?;
                Some((alg, bits, mode))
            }
        };
        let scheme = match r.u16("parameters.scheme")? {
            ALG_NULL => None,
            alg => Some((alg, r.u16("parameters.scheme.hashAlg")?)),
        };
        let key = match kind {
            ALG_RSA => {
                let key_bits = r.u16("parameters.keyBits")?;
                let exponent = r.u32("parameters.exponent")?;
                let modulus = r.sized("unique.rsa")?.to_vec();
                PublicKey::Rsa { key_bits, exponent, modulus }
            }
            ALG_ECC => {
                let curve = r.u16("parameters.curveID")?;
                if r.u16("parameters.kdf")? != ALG_NULL {
                    r.u16("parameters.kdf.hashAlg")?;
                }
                let x = r.sized("unique.ecc.x")?.to_vec();
                let y = r.sized("unique.ecc.y")?.to_vec();
                PublicKey::Ecc { curve, x, y }
            }
            other => return Err(bad(what, format!("key type 0x{other:04x} is neither RSA nor ECC"))),
        };
        r.end()?;
        Ok(TpmPublic { bytes: bytes.to_vec(), name_alg, attributes, auth_policy, symmetric, scheme, key })
    }

    /// The TPM Name: nameAlg followed by the nameAlg digest of the marshalled public area.
    pub fn name(&self) -> Vec<u8> {
        let mut n = ALG_SHA256.to_be_bytes().to_vec();
        n.extend_from_slice(&Sha256::digest(&self.bytes));
        n
    }

    /// A P-256 key with SHA-256 names that signs with ECDSA-SHA256; `rsa_hint` says
    /// what Outpost uses instead of an RSA key.
    fn require_p256_ecdsa(&self, what: &str, rsa_hint: &str) -> Result<()> {
        if self.name_alg != ALG_SHA256 {
            return Err(bad(what, format!("name algorithm 0x{:04x} is not SHA-256", self.name_alg)));
        }
        match &self.key {
            PublicKey::Ecc { curve: ECC_NIST_P256, x, y } if x.len() <= 32 && y.len() <= 32 => {}
            PublicKey::Ecc { curve, .. } => return Err(bad(what, format!("curve 0x{curve:04x} is not NIST P-256"))),
            PublicKey::Rsa { .. } => return Err(bad(what, format!("is an RSA key; {rsa_hint}"))),
        }
        if self.scheme != Some((ALG_ECDSA, ALG_SHA256)) {
            return Err(bad(what, format!("signing scheme {:?} is not ECDSA with SHA-256", self.scheme)));
        }
        Ok(())
    }

    fn require_attrs(&self, what: &str, set: &[(u32, &str)], clear: &[(u32, &str)]) -> Result<()> {
        for (bit, name) in set {
            if self.attributes & bit == 0 {
                return Err(bad(what, format!("attribute {name} is not set")));
            }
        }
        for (bit, name) in clear {
            if self.attributes & bit != 0 {
                return Err(bad(what, format!("attribute {name} is set")));
            }
        }
        Ok(())
    }

    /// An attestation key Outpost accepts: a restricted ECDSA-SHA256 P-256 signing key
    /// that was created inside the TPM and can never leave it.
    pub fn check_attestation_key(&self) -> Result<()> {
        const W: &str = "attestation key";
        self.require_p256_ecdsa(W, "Outpost uses ECC P-256 attestation keys")?;
        self.require_attrs(
            W,
            &[
                (attr::FIXED_TPM, "fixedTPM"),
                (attr::FIXED_PARENT, "fixedParent"),
                (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
                (attr::RESTRICTED, "restricted"),
                (attr::SIGN, "sign"),
            ],
            &[(attr::DECRYPT, "decrypt")],
        )
    }

    /// A TLS client key Outpost issues certificates for: an ECDSA-SHA256 P-256 signing
    /// key created inside the TPM that can never leave it (`fixedTPM`, `fixedParent`,
    /// `sensitiveDataOrigin`), not restricted (it signs handshakes, which the TPM did
    /// not hash itself) nor a decryption key, and usable with its auth value only: no
    /// authorization policy and `adminWithPolicy` clear. (A public area loaded on its
    /// own with TPM2_LoadExternal may claim any attributes, but has no auth value: with
    /// no policy either, TPM2_Certify cannot be authorized for it, so a certification
    /// of such a key comes only from a key the TPM made.)
    pub fn check_tls_client_key(&self) -> Result<()> {
        const W: &str = "TLS client key";
        self.require_p256_ecdsa(W, "Outpost issues certificates for ECC P-256 keys")?;
        if !self.auth_policy.is_empty() {
            return Err(bad(W, format!("has an authorization policy ({} bytes); Outpost certifies keys without one", self.auth_policy.len())));
        }
        self.require_attrs(
            W,
            &[
                (attr::FIXED_TPM, "fixedTPM"),
                (attr::FIXED_PARENT, "fixedParent"),
                (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
                (attr::USER_WITH_AUTH, "userWithAuth"),
                (attr::SIGN, "sign"),
            ],
            &[(attr::RESTRICTED, "restricted"), (attr::DECRYPT, "decrypt"), (attr::ADMIN_WITH_POLICY, "adminWithPolicy")],
        )
    }

    /// An endorsement key Outpost can make credentials for: the TCG default RSA-2048
    /// storage key (restricted decryption, AES-128-CFB, SHA-256 names).
    pub fn check_endorsement_key(&self) -> Result<()> {
        const W: &str = "endorsement key";
        if self.name_alg != ALG_SHA256 {
            return Err(bad(W, format!("name algorithm 0x{:04x} is not SHA-256", self.name_alg)));
        }
        match &self.key {
            // A TPM's RSA-2048 modulus has its top bit set (2048 bits, not 256 bytes
            // with leading zeros: a smaller key) and is odd.
            PublicKey::Rsa { key_bits: 2048, exponent: 0 | 65537, modulus }
                if modulus.len() == 256 && modulus[0] & 0x80 != 0 && modulus[255] & 1 == 1 => {}
            PublicKey::Rsa { key_bits: 2048, exponent: 0 | 65537, modulus } => {
                return Err(bad(W, format!("modulus is not a 2048-bit odd number ({} bytes, first byte 0x{:02x})", modulus.len(), modulus.first().copied().unwrap_or(0))))
            }
            PublicKey::Rsa { key_bits: 2048, exponent, .. } => return Err(bad(W, format!("RSA exponent {exponent} is not 65537"))),
            PublicKey::Rsa { key_bits, .. } => return Err(bad(W, format!("RSA key of {key_bits} bits; Outpost needs the RSA-2048 EK"))),
            PublicKey::Ecc { .. } => return Err(bad(W, "is an ECC key; Outpost makes credentials for the RSA-2048 EK")),
        }
        if self.symmetric != Some((ALG_AES, 128, ALG_CFB)) {
            return Err(bad(W, format!("symmetric definition {:?} is not AES-128-CFB", self.symmetric)));
        }
        self.require_attrs(
            W,
            &[
                (attr::FIXED_TPM, "fixedTPM"),
                (attr::FIXED_PARENT, "fixedParent"),
                (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
                (attr::RESTRICTED, "restricted"),
                (attr::DECRYPT, "decrypt"),
            ],
            &[(attr::SIGN, "sign")],
        )
    }

    /// The uncompressed SEC1 point of an ECC key (for signature verification).
    pub fn ecc_point(&self) -> Option<Vec<u8>> {
        match &self.key {
            PublicKey::Ecc { x, y, .. } => {
                let mut p = vec![0x04];
                p.extend(pad32(x)?);
                p.extend(pad32(y)?);
                Some(p)
            }
            PublicKey::Rsa { .. } => None,
        }
    }
}

fn pad32(v: &[u8]) -> Option<[u8; 32]> {
    if v.len() > 32 {
        return None;
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Some(out)
}

/// One bank of a PCR selection: its hash algorithm and the selected PCR indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrBank {
    pub hash: u16,
    pub pcrs: Vec<u32>,
}

/// What a verified quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    pub selection: Vec<PcrBank>,
    pub pcr_digest: Vec<u8>,
}

impl Quote {
    /// Parses a marshalled `TPMS_ATTEST` that must be a quote.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "quote");
        if r.u32("magic")? != TPM_GENERATED_VALUE {
            return Err(bad("quote", "magic is not TPM_GENERATED_VALUE: not produced by a TPM"));
        }
        let kind = r.u16("type")?;
        if kind != TPM_ST_ATTEST_QUOTE {
            return Err(bad("quote", format!("attestation type 0x{kind:04x} is not a quote")));
        }
        let _signer = r.sized("qualifiedSigner")?;
        let extra_data = r.sized("extraData")?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let _safe = r.u8("clockInfo.safe")?;
        let firmware_version = r.u64("firmwareVersion")?;
        let banks = r.u32("pcrSelect.count")?;
        if banks > 16 {
            return Err(bad("quote", format!("{banks} PCR banks selected")));
        }
        let mut selection = Vec::new();
        for _ in 0..banks {
            let hash = r.u16("pcrSelect.hash")?;
            let size = r.u8("pcrSelect.sizeofSelect")? as usize;
            let bits = r.take(size, "pcrSelect.pcrSelect")?;
            let pcrs = (0..size * 8).filter(|i| bits[i / 8] & (1 << (i % 8)) != 0).map(|i| i as u32).collect();
            selection.push(PcrBank { hash, pcrs });
        }
        let pcr_digest = r.sized("pcrDigest")?.to_vec();
        r.end()?;
        Ok(Quote { extra_data, clock, reset_count, restart_count, firmware_version, selection, pcr_digest })
    }

    /// Checks `signature` (a marshalled `TPMT_SIGNATURE`) over `attest` with the
    /// attestation key, then parses the quote.
    pub fn verify(ak: &TpmPublic, attest: &[u8], signature: &[u8]) -> Result<Self> {
        verify_signature(ak, "quote signature", attest, signature)?;
        Quote::parse(attest)
    }

    /// The SHA-256 bank's selected PCRs, or an error when the quote selects anything else.
    pub fn sha256_pcrs(&self) -> Result<&[u32]> {
        match self.selection.as_slice() {
            [PcrBank { hash: ALG_SHA256, pcrs }] if !pcrs.is_empty() => Ok(pcrs),
            other => Err(bad("quote", format!("PCR selection {other:?} is not one SHA-256 bank"))),
        }
    }
}

/// Checks `signature` (a marshalled ECDSA-SHA256 `TPMT_SIGNATURE`) over `attest` with
/// the attestation key `ak`. `what` names the signature in errors.
fn verify_signature(ak: &TpmPublic, what: &'static str, attest: &[u8], signature: &[u8]) -> Result<()> {
    let mut r = Reader::new(signature, what);
    let alg = r.u16("sigAlg")?;
    let hash = r.u16("hash")?;
    if (alg, hash) != (ALG_ECDSA, ALG_SHA256) {
        return Err(bad(what, format!("scheme 0x{alg:04x}/0x{hash:04x} is not ECDSA with SHA-256")));
    }
    let sr = pad32(r.sized("signatureR")?).ok_or_else(|| bad(what, "r is longer than 32 bytes"))?;
    let ss = pad32(r.sized("signatureS")?).ok_or_else(|| bad(what, "s is longer than 32 bytes"))?;
    r.end()?;
    let point = ak.ecc_point().ok_or_else(|| bad("attestation key", "is not an ECC key"))?;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(&sr);
    sig[32..].copy_from_slice(&ss);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(attest, &sig)
        .map_err(|_| bad(what, "does not verify with this device's attestation key"))
}

/// What a verified TPM2_Certify says: the TPM that holds the attestation key had the
/// object named `name` loaded when it signed (so an object with `fixedTPM` lives in
/// that same TPM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certification {
    pub extra_data: Vec<u8>,
    /// The certified object's Name (nameAlg, then the digest of its public area).
    pub name: Vec<u8>,
    /// Its qualified name: the digest chain of the Names of its ancestors down to the
    /// hierarchy it was made (or loaded) in.
    pub qualified_name: Vec<u8>,
}

impl Certification {
    /// Parses a marshalled `TPMS_ATTEST` that must be a certification.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        const W: &str = "key certification";
        let mut r = Reader::new(bytes, W);
        if r.u32("magic")? != TPM_GENERATED_VALUE {
            return Err(bad(W, "magic is not TPM_GENERATED_VALUE: not produced by a TPM"));
        }
        let kind = r.u16("type")?;
        if kind != TPM_ST_ATTEST_CERTIFY {
            return Err(bad(W, format!("attestation type 0x{kind:04x} is not a certification (TPM2_Certify)")));
        }
        let _signer = r.sized("qualifiedSigner")?;
        let extra_data = r.sized("extraData")?.to_vec();
        r.take(17, "clockInfo")?;
        r.u64("firmwareVersion")?;
        let name = r.sized("attested.certify.name")?.to_vec();
        let qualified_name = r.sized("attested.certify.qualifiedName")?.to_vec();
        r.end()?;
        Ok(Certification { extra_data, name, qualified_name })
    }

    /// Checks `signature` over `attest` with the attestation key, then parses it.
    pub fn verify(ak: &TpmPublic, attest: &[u8], signature: &[u8]) -> Result<Self> {
        verify_signature(ak, "key certification signature", attest, signature)?;
        Certification::parse(attest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real EK public area (swtpm, `tpm2_createek -G rsa`).
    const SWTPM_EK: &[u8] = include_bytes!("testdata/swtpm-ek-rsa2048.bin");

    #[test]
    fn a_real_rsa_2048_ek_is_accepted() {
        let ek = TpmPublic::parse(SWTPM_EK, "endorsement key").unwrap_or_else(|e| panic!("{e}"));
        assert!(ek.check_endorsement_key().is_ok(), "{:?}", ek.check_endorsement_key());
    }

    /// Found by `fuzz/fuzz_targets/tpm_public.rs`: a 256-byte modulus that starts with
    /// zero bytes is a key of fewer than 2048 bits, and the credential made for it was
    /// 254 bytes, not the TPM2B_ENCRYPTED_SECRET of an RSA-2048 EK. An EK whose
    /// modulus is small enough to factor would let anyone open the credential.
    #[test]
    fn an_ek_modulus_with_leading_zero_bytes_is_not_rsa_2048() {
        let bytes = include_bytes!("testdata/fuzz-ek-modulus-leading-zeros.bin");
        let ek = TpmPublic::parse(bytes, "endorsement key").unwrap_or_else(|e| panic!("{e}"));
        let err = ek.check_endorsement_key().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("modulus is not a 2048-bit odd number"), "accepted, or another reason: {err:?}");
        // Shrinking the real EK's modulus the same way is refused too, and so is an even one.
        for (index, value) in [(0usize, 0x00u8), (255, 0x00)] {
            let mut ek = TpmPublic::parse(SWTPM_EK, "endorsement key").unwrap_or_else(|e| panic!("{e}"));
            if let PublicKey::Rsa { modulus, .. } = &mut ek.key {
                modulus[index] = value;
            }
            assert!(ek.check_endorsement_key().is_err(), "modulus byte {index} = {value:#04x} accepted");
        }
    }
}
