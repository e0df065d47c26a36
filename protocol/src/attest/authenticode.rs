//! The Authenticode SHA-256 of a PE/COFF image: what UEFI firmware extends into PCR 4
//! when it starts an EFI application (EV_EFI_BOOT_SERVICES_APPLICATION), so a release
//! pipeline can compute the bootloader's golden value from the file it ships.
//!
//! The digest covers the headers without the checksum field and without the
//! certificate-table directory entry, then each section's raw data in file order, then
//! whatever follows the last section up to the attribute certificates (if any). The
//! image is untrusted input: every offset and size is checked against the file.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const PE32: u16 = 0x10b;
const PE32_PLUS: u16 = 0x20b;
const SECTION_HEADER: usize = 40;
const MAX_SECTIONS: usize = 96;
/// Index of the certificate table in the optional header's data directories.
const CERTIFICATE_TABLE: usize = 4;

fn bad(reason: impl Into<String>) -> Error {
    Error::Integrity { what: "PE/COFF image".into(), reason: reason.into() }
}

fn u16_at(b: &[u8], at: usize, field: &str) -> Result<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or_else(|| bad(format!("{field} at byte {at} is past the end ({} bytes)", b.len())))
}

fn u32_at(b: &[u8], at: usize, field: &str) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad(format!("{field} at byte {at} is past the end ({} bytes)", b.len())))
}

fn range<'a>(b: &'a [u8], start: usize, end: usize, what: &str) -> Result<&'a [u8]> {
    b.get(start..end).ok_or_else(|| bad(format!("{what} (bytes {start}..{end}) is not inside the {}-byte image", b.len())))
}

/// Where the parts the digest skips or walks are.
struct Layout {
    checksum: usize,
    /// Offset of the certificate-table directory entry, when the image has one.
    cert_entry: Option<usize>,
    headers_end: usize,
    /// (PointerToRawData, SizeOfRawData) of each section.
    sections: Vec<(usize, usize)>,
    /// (file offset, size) of the attribute certificates.
    certs: Option<(usize, usize)>,
}

fn layout(b: &[u8]) -> Result<Layout> {
    if b.get(0..2) != Some(b"MZ") {
        return Err(bad("no MZ signature: not a PE/COFF image"));
    }
    let pe = u32_at(b, 0x3c, "e_lfanew")? as usize;
    if b.get(pe..pe.saturating_add(4)) != Some(b"PE\0\0") {
        return Err(bad(format!("no PE signature at e_lfanew ({pe})")));
    }
    let sections = u16_at(b, pe + 6, "NumberOfSections")? as usize;
    let opt_size = u16_at(b, pe + 20, "SizeOfOptionalHeader")? as usize;
    let opt = pe + 24;
    let (dirs, count_at) = match u16_at(b, opt, "optional header Magic")? {
        PE32 => (opt + 96, opt + 92),
        PE32_PLUS => (opt + 112, opt + 108),
        m => return Err(bad(format!("optional header magic 0x{m:04x} is neither PE32 nor PE32+"))),
    };
    let dir_count = u32_at(b, count_at, "NumberOfRvaAndSizes")? as usize;
    if dirs + dir_count.min(16) * 8 > opt + opt_size {
        return Err(bad(format!("{dir_count} data directories do not fit a {opt_size}-byte optional header")));
    }
    let cert_entry = (dir_count > CERTIFICATE_TABLE).then_some(dirs + CERTIFICATE_TABLE * 8);
    let certs = match cert_entry {
        Some(at) => match (u32_at(b, at, "certificate table")? as usize, u32_at(b, at + 4, "certificate table size")? as usize) {
            (_, 0) => None,
            (offset, size) => {
                range(b, offset, offset.saturating_add(size), "certificate table")?;
                Some((offset, size))
            }
        },
        None => None,
    };
    let headers_end = u32_at(b, opt + 60, "SizeOfHeaders")? as usize;
    let table = opt + opt_size;
    if sections > MAX_SECTIONS || table + sections * SECTION_HEADER > headers_end {
        return Err(bad(format!("{sections} section headers do not fit before SizeOfHeaders ({headers_end})")));
    }
    let mut list = Vec::with_capacity(sections);
    for i in 0..sections {
        let h = table + i * SECTION_HEADER;
        let size = u32_at(b, h + 16, "SizeOfRawData")? as usize;
        let offset = u32_at(b, h + 20, "PointerToRawData")? as usize;
        if size != 0 {
            range(b, offset, offset.saturating_add(size), &format!("section {i}"))?;
            list.push((offset, size));
        }
    }
    list.sort_unstable();
    Ok(Layout { checksum: opt + 64, cert_entry, headers_end, sections: list, certs })
}

/// The Authenticode SHA-256 of a PE/COFF image, as UEFI firmware measures it.
pub fn authenticode_sha256(image: &[u8]) -> Result<[u8; 32]> {
    let l = layout(image)?;
    let mut h = Sha256::new();
    h.update(range(image, 0, l.checksum, "headers before CheckSum")?);
    match l.cert_entry {
        Some(entry) => {
            h.update(range(image, l.checksum + 4, entry, "headers between CheckSum and the certificate entry")?);
            h.update(range(image, entry + 8, l.headers_end, "headers after the certificate entry")?);
        }
        None => h.update(range(image, l.checksum + 4, l.headers_end, "headers after CheckSum")?),
    }
    let mut hashed = l.headers_end;
    for (offset, size) in &l.sections {
        h.update(&image[*offset..*offset + *size]);
        hashed += size;
    }
    let end = match l.certs {
        Some((offset, size)) if offset + size == image.len() => offset,
        Some((offset, _)) => return Err(bad(format!("the certificate table at byte {offset} does not end the image"))),
        None => image.len(),
    };
    if end > hashed {
        h.update(&image[hashed..end]);
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small PE32+ image made for this test (two sections whose headers are not in
    /// file order, data after the last section), the same image signed by
    /// `osslsigncode sign` with a throwaway certificate, and the Authenticode digest
    /// `osslsigncode verify` calculated: an implementation apart from this one.
    const SMALL_PE: &[u8] = include_bytes!("testdata/small-pe32plus.efi");
    const SMALL_PE_SIGNED: &[u8] = include_bytes!("testdata/small-pe32plus-signed.efi");
    const SMALL_PE_DIGEST: &str = include_str!("testdata/small-pe32plus.efi.authenticode-sha256");

    #[test]
    fn the_digest_is_what_another_implementation_computes() {
        let digest = authenticode_sha256(SMALL_PE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(hex::encode(digest), SMALL_PE_DIGEST.trim().to_lowercase());
        // Signing adds a certificate table and changes the checksum and the directory
        // entry: none of them is covered.
        assert_ne!(SMALL_PE_SIGNED, SMALL_PE);
        assert_eq!(authenticode_sha256(SMALL_PE_SIGNED).ok(), Some(digest));
        // A certificate table that does not end the image is refused.
        let mut extra = SMALL_PE_SIGNED.to_vec();
        extra.extend([0u8; 8]);
        assert!(authenticode_sha256(&extra).is_err());
    }

    #[test]
    fn the_checksum_is_skipped_and_everything_else_counts() {
        let base = authenticode_sha256(SMALL_PE).unwrap_or_else(|e| panic!("{e}"));
        let l = layout(SMALL_PE).unwrap_or_else(|e| panic!("{e}"));
        let mut image = SMALL_PE.to_vec();
        image[l.checksum] ^= 0xff;
        assert_eq!(authenticode_sha256(&image).ok(), Some(base), "the checksum is not covered");
        for at in [0x40, l.headers_end - 1, l.sections[0].0, image.len() - 1] {
            let mut image = SMALL_PE.to_vec();
            image[at] ^= 0x01;
            assert_ne!(authenticode_sha256(&image).ok(), Some(base), "byte {at} is not covered");
        }
    }

    #[test]
    fn malformed_images_are_refused_not_read_past() {
        assert!(authenticode_sha256(b"").is_err());
        assert!(authenticode_sha256(b"MZ").is_err());
        let l = layout(SMALL_PE).unwrap_or_else(|e| panic!("{e}"));
        let mut short = SMALL_PE.to_vec();
        short.truncate(l.sections[l.sections.len() - 1].0 + 1);
        let e = authenticode_sha256(&short).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("section") && e.contains("not inside"), "{e}");
        let mut far = SMALL_PE.to_vec();
        far[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(authenticode_sha256(&far).is_err());
    }
}
