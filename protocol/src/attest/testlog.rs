//! Test-only: builds crypto-agile event logs byte by byte, and keeps its own model of
//! the PCRs they extend (written apart from `replay.rs`, so a replay bug cannot hide
//! behind the same code on both sides), so tests can make the quote a TPM would sign.

use sha2::{Digest, Sha256};

use crate::attest::eventlog::EventType;
use crate::attest::tpm::{PcrBank, Quote, ALG_SHA256};

pub struct LogBuilder {
    banks: Vec<(u16, u16)>,
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    size_fields: Vec<usize>,
    /// The SHA-256 PCR values a TPM would hold after these events.
    pub pcrs: [[u8; 32]; 24],
}

impl LogBuilder {
    /// A log with SHA-1 and SHA-256 banks, as OVMF writes them.
    pub fn new() -> Self {
        Self::with_banks(&[(0x0004, 20), (ALG_SHA256, 32)])
    }

    pub fn with_banks(banks: &[(u16, u16)]) -> Self {
        let mut spec = b"Spec ID Event03\0".to_vec();
        spec.extend(0u32.to_le_bytes()); // platformClass: client
        spec.extend([0, 2, 0, 2]); // version 2.0 errata 0, uintnSize 2 (64-bit)
        spec.extend((banks.len() as u32).to_le_bytes());
        for (alg, size) in banks {
            spec.extend(alg.to_le_bytes());
            spec.extend(size.to_le_bytes());
        }
        spec.push(0); // vendorInfoSize
        let mut bytes = Vec::new();
        bytes.extend(0u32.to_le_bytes());
        bytes.extend(EventType::NoAction.code().to_le_bytes());
        bytes.extend([0u8; 20]);
        bytes.extend((spec.len() as u32).to_le_bytes());
        bytes.extend(spec);
        let mut pcrs = [[0u8; 32]; 24];
        for p in &mut pcrs[17..=22] {
            *p = [0xff; 32];
        }
        LogBuilder { banks: banks.to_vec(), bytes, offsets: Vec::new(), size_fields: Vec::new(), pcrs }
    }

    /// Appends an event whose SHA-256 digest is `sha256` (other banks get filler) and
    /// extends the model unless it is EV_NO_ACTION.
    pub fn extend(&mut self, pcr: u32, event_type: EventType, data: &[u8], sha256: [u8; 32]) -> &mut Self {
        self.offsets.push(self.bytes.len());
        self.bytes.extend(pcr.to_le_bytes());
        self.bytes.extend(event_type.code().to_le_bytes());
        self.bytes.extend((self.banks.len() as u32).to_le_bytes());
        for (alg, size) in &self.banks {
            self.bytes.extend(alg.to_le_bytes());
            let filler: Vec<u8> = sha256.iter().cycle().take(*size as usize).copied().collect();
            self.bytes.extend(if *alg == ALG_SHA256 { sha256.to_vec() } else { filler });
        }
        self.size_fields.push(self.bytes.len());
        self.bytes.extend((data.len() as u32).to_le_bytes());
        self.bytes.extend(data);
        if event_type != EventType::NoAction {
            if let Some(value) = self.pcrs.get_mut(pcr as usize) {
                let mut h = Sha256::new();
                h.update(*value);
                h.update(sha256);
                value.copy_from_slice(&h.finalize());
            }
        }
        self
    }

    /// An event whose digest is the SHA-256 of `content`.
    pub fn measure(&mut self, pcr: u32, event_type: EventType, data: &[u8], content: &[u8]) -> &mut Self {
        self.extend(pcr, event_type, data, Sha256::digest(content).into())
    }

    /// An event whose digest is the SHA-256 of its own data (EV_SEPARATOR, EV_EFI_ACTION).
    pub fn self_measured(&mut self, pcr: u32, event_type: EventType, data: &[u8]) -> &mut Self {
        self.measure(pcr, event_type, data, data)
    }

    /// A file as GRUB's tpm module measures it: PCR 9, EV_IPL, the file name and a NUL
    /// as data, the SHA-256 of the file's bytes as digest.
    pub fn grub_file(&mut self, name: &str, content: &[u8]) -> &mut Self {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        self.measure(9, EventType::Ipl, &data, content)
    }

    /// A string as GRUB measures it: PCR 8, EV_IPL, prefix + string + NUL as data, the
    /// SHA-256 of the string alone as digest.
    pub fn grub_string(&mut self, prefix: &str, text: &str) -> &mut Self {
        let data = format!("{prefix}{text}\0");
        self.measure(8, EventType::Ipl, data.as_bytes(), text.as_bytes())
    }

    /// The StartupLocality EV_NO_ACTION event: PCR 0 starts at the locality.
    pub fn startup_locality(&mut self, locality: u8) -> &mut Self {
        let mut data = b"StartupLocality\0".to_vec();
        data.push(locality);
        self.pcrs[0] = [0; 32];
        self.pcrs[0][31] = locality;
        self.extend(0, EventType::NoAction, &data, [0; 32])
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Byte offsets of the events (not the header), in order.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Byte offset of event `i`'s eventSize field.
    pub fn event_size_at(&self, i: usize) -> usize {
        self.size_fields[i]
    }

    /// A quote of these PCRs' modelled values (the fields a signature check fills).
    pub fn quote(&self, pcrs: &[u32]) -> Quote {
        quote_of(&self.pcrs, pcrs)
    }
}

/// The quote a TPM holding `values` would make over `pcrs` (ascending, as a TPM does).
pub fn quote_of(values: &[[u8; 32]; 24], pcrs: &[u32]) -> Quote {
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for p in &sorted {
        h.update(values[*p as usize]);
    }
    Quote {
        extra_data: Vec::new(),
        clock: 0,
        reset_count: 0,
        restart_count: 0,
        firmware_version: 0,
        selection: vec![PcrBank { hash: ALG_SHA256, pcrs: sorted }],
        pcr_digest: h.finalize().to_vec(),
    }
}
