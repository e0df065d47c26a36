//! `outpost release publish --boot-*`: the golden values of a measured boot, computed
//! from the artifacts the pipeline ships (the EFI bootloader, kernel, initrd, command
//! line, other files GRUB loads) and signed into the release's metadata, so the server
//! can hold a device's quoted event log against them.

use std::path::{Path, PathBuf};

use clap::Args;
use outpost_protocol::attest::golden::{BootArtifacts, GoldenValues};
use outpost_protocol::verity::Verity;
use std::io::Read;

use crate::error::{Result, SignerError};

#[derive(Debug, Default, Args)]
pub struct BootArgs {
    /// Measured boot: an EFI application the firmware starts (shim, GRUB; repeatable).
    /// Its Authenticode digest is golden for PCR 4. Golden values need --boot-efi,
    /// --boot-kernel, --boot-initrd and --boot-cmdline together.
    #[arg(long = "boot-efi", requires_all = ["boot_kernel", "boot_initrd", "boot_cmdlines"])]
    pub boot_efi: Vec<PathBuf>,
    /// The kernel GRUB loads (golden for PCR 9).
    #[arg(long, requires_all = ["boot_efi", "boot_initrd", "boot_cmdlines"])]
    pub boot_kernel: Option<PathBuf>,
    /// The initrd GRUB loads (golden for PCR 9).
    #[arg(long, requires_all = ["boot_efi", "boot_kernel", "boot_cmdlines"])]
    pub boot_initrd: Option<PathBuf>,
    /// A kernel command line exactly as grub.cfg's `linux` command passes it after
    /// GRUB expands variables, kernel path first (`(hd0,gpt2)/boot/vmlinuz root=...
    /// ro`; golden for PCR 8). Repeatable: one per slot the release boots from.
    #[arg(long = "boot-cmdline", requires_all = ["boot_efi", "boot_kernel", "boot_initrd"])]
    pub boot_cmdlines: Vec<String>,
    /// Another file GRUB loads and measures: grub.cfg, a module, a font (repeatable;
    /// golden for PCR 9).
    #[arg(long = "boot-file", requires = "boot_kernel")]
    pub boot_files: Vec<PathBuf>,
    /// The image is a root filesystem under dm-verity: its first N 4096-byte blocks are
    /// the filesystem, the hash tree follows (`veritysetup format --no-superblock
    /// --format=1 --hash-offset=N*4096`). The root hash is computed here from the data
    /// blocks, the image's tree must be the one computed, and every --boot-cmdline
    /// must carry `outpost.verity=ROOT,SALT,N`.
    #[arg(long, requires = "verity_salt", value_name = "N")]
    pub verity_data_blocks: Option<u64>,
    /// The hex salt the tree was built with (see --verity-data-blocks).
    #[arg(long, requires = "verity_data_blocks", value_name = "HEX")]
    pub verity_salt: Option<String>,
}

/// A file's name (for people reading the golden values) and bytes.
fn read(flag: &str, path: &Path) -> Result<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| SignerError::io("read", path, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| SignerError::Usage(format!("{flag} {}: needs a file name", path.display())))?;
    Ok((name, bytes))
}

fn borrow(file: &(String, Vec<u8>)) -> (&str, &[u8]) {
    (file.0.as_str(), file.1.as_slice())
}

impl BootArgs {
    /// The golden values these flags describe, or None when no --boot-* flag was given.
    pub fn golden(&self) -> Result<Option<GoldenValues>> {
        let (Some(kernel), Some(initrd)) = (&self.boot_kernel, &self.boot_initrd) else {
            return Ok(None);
        };
        let efis = self.boot_efi.iter().map(|p| read("--boot-efi", p)).collect::<Result<Vec<_>>>()?;
        let files = self.boot_files.iter().map(|p| read("--boot-file", p)).collect::<Result<Vec<_>>>()?;
        let (kernel, initrd) = (read("--boot-kernel", kernel)?, read("--boot-initrd", initrd)?);
        let artifacts = BootArtifacts {
            bootloaders: efis.iter().map(borrow).collect(),
            kernel: borrow(&kernel),
            initrd: borrow(&initrd),
            kernel_cmdlines: self.boot_cmdlines.iter().map(String::as_str).collect(),
            boot_files: files.iter().map(borrow).collect(),
        };
        GoldenValues::compute(&artifacts).map(Some).map_err(|e| SignerError::proto("--boot-* golden values", e))
    }

    /// The dm-verity parameters of `image` (None without --verity-data-blocks): the root
    /// hash computed from its data blocks, after checking that the tree the image
    /// carries is that one, that nothing follows it, and that every golden command
    /// line passes it.
    pub fn verity(&self, image: &Path, golden: Option<&GoldenValues>) -> Result<Option<Verity>> {
        let (Some(data_blocks), Some(salt)) = (self.verity_data_blocks, &self.verity_salt) else {
            return Ok(None);
        };
        let usage = |m: String| Err(SignerError::Usage(m));
        let salt_bytes = match hex::decode(salt) {
            Ok(b) if salt.bytes().all(|c| !c.is_ascii_uppercase()) => b,
            _ => return usage(format!("--verity-salt {salt:?}: not lower-case hex")),
        };
        let length = std::fs::metadata(image).map_err(|e| SignerError::io("stat", image, e))?.len();
        let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(image).map_err(|e| SignerError::io("open", image, e))?);
        let tree = Verity::compute(&mut file, data_blocks, &salt_bytes).map_err(|e| SignerError::io("read the data blocks of", image, e))?;
        let verity = Verity { data_blocks, salt: salt.clone(), root_hash: hex::encode(tree.root) };
        verity.validate(length).map_err(|e| SignerError::proto(format!("--verity-data-blocks {data_blocks} of {}", image.display()), e))?;
        let mut carried = Vec::with_capacity(tree.blocks.len());
        file.read_to_end(&mut carried).map_err(|e| SignerError::io("read the hash tree of", image, e))?;
        if carried != tree.blocks {
            let at = carried.iter().zip(&tree.blocks).position(|(a, b)| a != b).unwrap_or(0) as u64 + data_blocks * outpost_protocol::verity::BLOCK;
            return usage(format!(
                "{}: the hash tree after block {data_blocks} is not the one its data blocks give (root {}); first difference at byte {at}. \
                 Was it formatted with --salt {salt} and --hash-offset {}?",
                image.display(),
                verity.root_hash,
                data_blocks * outpost_protocol::verity::BLOCK
            ));
        }
        for c in golden.map(|g| g.kernel_cmdlines.as_slice()).unwrap_or_default() {
            if !outpost_protocol::verity::cmdline_carries(c, &verity) {
                return usage(format!("--boot-cmdline {c:?} does not pass {}{} (once): the slot would not boot verified", outpost_protocol::verity::KERNEL_ARG, verity.arg_value()));
            }
        }
        Ok(Some(verity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use sha2::{Digest, Sha256};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        boot: BootArgs,
    }

    const EFI: &[u8] = include_bytes!("../../protocol/src/attest/testdata/small-pe32plus.efi");
    const EFI_AUTHENTICODE: &str = include_str!("../../protocol/src/attest/testdata/small-pe32plus.efi.authenticode-sha256");

    #[test]
    fn golden_values_are_computed_from_the_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{e}"));
            p.to_string_lossy().into_owned()
        };
        let (efi, kernel, initrd, cfg) = (write("grubx64.efi", EFI), write("vmlinuz", b"kernel"), write("initrd.img", b"initrd"), write("grub.cfg", b"cfg"));
        let args = ["t", "--boot-efi", &efi, "--boot-kernel", &kernel, "--boot-initrd", &initrd, "--boot-cmdline", "/vmlinuz root=/dev/vda2 ro", "--boot-file", &cfg];
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
        let golden = cli.boot.golden().unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|| panic!("no golden values"));
        assert_eq!(golden.bootloaders[0].sha256, EFI_AUTHENTICODE.trim());
        assert_eq!((golden.kernel.name.as_str(), golden.kernel.sha256.clone()), ("vmlinuz", hex::encode(Sha256::digest(b"kernel"))));
        assert_eq!(golden.initrd.sha256, hex::encode(Sha256::digest(b"initrd")));
        assert_eq!(golden.boot_files[0].name, "grub.cfg");
        assert_eq!(golden.kernel_cmdlines, ["/vmlinuz root=/dev/vda2 ro"]);
        // Part of the set is refused by the parser, none of it is no golden values.
        assert!(Cli::try_parse_from(["t", "--boot-kernel", &kernel]).is_err());
        assert!(Cli::try_parse_from(["t"]).map(|c| c.boot.golden().ok().flatten().is_none()).unwrap_or(false));
        // A kernel given as the EFI application is not a PE image, a quoted command
        // line is not measured as written: both refused with the reason.
        let bad = Cli::try_parse_from(["t", "--boot-efi", &kernel, "--boot-kernel", &kernel, "--boot-initrd", &initrd, "--boot-cmdline", "/vmlinuz"]).unwrap_or_else(|e| panic!("{e}"));
        let e = bad.boot.golden().err().map(|e| outpost_protocol::display_chain(&e)).unwrap_or_default();
        assert!(e.contains("bootloader vmlinuz") && e.contains("MZ"), "{e}");
        let quoted = Cli::try_parse_from(["t", "--boot-efi", &efi, "--boot-kernel", &kernel, "--boot-initrd", &initrd, "--boot-cmdline", "/vmlinuz a=\"b c\""]).unwrap_or_else(|e| panic!("{e}"));
        assert!(quoted.boot.golden().is_err());
    }

    /// A 200-block "filesystem" and the tree `Verity::compute` gives it (the tree
    /// itself is checked against veritysetup's in protocol::verity).
    fn verity_image(dir: &Path, salt: &[u8]) -> (PathBuf, Vec<u8>, Verity) {
        let data: Vec<u8> = (0..200 * 4096u32).map(|i| (i % 253) as u8).collect();
        let tree = Verity::compute(&mut &data[..], 200, salt).unwrap_or_else(|e| panic!("{e}"));
        let mut image = data;
        image.extend_from_slice(&tree.blocks);
        let path = dir.join("root.img");
        std::fs::write(&path, &image).unwrap_or_else(|e| panic!("{e}"));
        (path, image, Verity { data_blocks: 200, salt: hex::encode(salt), root_hash: hex::encode(tree.root) })
    }

    fn verity_of(path: &Path, extra: &[&str]) -> std::result::Result<Option<Verity>, String> {
        let mut args = vec!["t", "--verity-data-blocks", "200", "--verity-salt", "0a0b"];
        args.extend_from_slice(extra);
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let golden = cli.boot.golden().map_err(|e| e.to_string())?;
        cli.boot.verity(path, golden.as_ref()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_verity_root_is_computed_and_the_image_must_carry_its_tree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (path, image, want) = verity_image(dir.path(), &[0x0a, 0x0b]);
        assert_eq!(verity_of(&path, &[]), Ok(Some(want.clone())));
        // A tree block changed (root forges the tree to match a changed filesystem
        // but keeps the old root): refused, naming where.
        let mut forged = image.clone();
        forged[200 * 4096 + 5] ^= 1;
        std::fs::write(&path, &forged).unwrap_or_else(|e| panic!("{e}"));
        let e = verity_of(&path, &[]).unwrap_err();
        assert!(e.contains("first difference at byte 819205"), "{e}");
        // A changed data block: its tree no longer matches what the image carries.
        let mut changed = image.clone();
        changed[4096 * 17] ^= 1;
        std::fs::write(&path, &changed).unwrap_or_else(|e| panic!("{e}"));
        assert!(verity_of(&path, &[]).unwrap_err().contains("not the one its data blocks give"));
        // Bytes after the tree, or another salt, or a tree cut short.
        let mut trailing = image.clone();
        trailing.push(0);
        std::fs::write(&path, &trailing).unwrap_or_else(|e| panic!("{e}"));
        assert!(verity_of(&path, &[]).unwrap_err().contains("the image is"));
        std::fs::write(&path, &image[..image.len() - 1]).unwrap_or_else(|e| panic!("{e}"));
        assert!(verity_of(&path, &[]).is_err());
        std::fs::write(&path, &image).unwrap_or_else(|e| panic!("{e}"));
        let other = Cli::try_parse_from(["t", "--verity-data-blocks", "200", "--verity-salt", "0a0c"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(other.boot.verity(&path, None).is_err());
        let upper = Cli::try_parse_from(["t", "--verity-data-blocks", "200", "--verity-salt", "0A0B"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(upper.boot.verity(&path, None).unwrap_err().to_string().contains("lower-case hex"));
        // Half of the pair is a usage error.
        assert!(Cli::try_parse_from(["t", "--verity-salt", "0a0b"]).is_err());
    }

    #[test]
    fn every_golden_command_line_must_pass_the_verity_root() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (path, _, want) = verity_image(dir.path(), &[0x0a, 0x0b]);
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{e}"));
            p.to_string_lossy().into_owned()
        };
        let (efi, kernel, initrd) = (write("grubx64.efi", EFI), write("vmlinuz", b"kernel"), write("initrd.img", b"initrd"));
        let good = format!("/vmlinuz root=/dev/vda2 outpost.verity={}", want.arg_value());
        let boot = ["--boot-efi", &efi, "--boot-kernel", &kernel, "--boot-initrd", &initrd];
        let mut args = boot.to_vec();
        args.extend(["--boot-cmdline", &good]);
        assert_eq!(verity_of(&path, &args), Ok(Some(want.clone())));
        // One slot's command line without it (or with another release's) is refused.
        let stale = format!("/vmlinuz root=/dev/vda3 outpost.verity={}", Verity { root_hash: "00".repeat(32), ..want.clone() }.arg_value());
        for bad in ["/vmlinuz root=/dev/vda3", stale.as_str()] {
            let mut args = boot.to_vec();
            args.extend(["--boot-cmdline", &good, "--boot-cmdline", bad]);
            let e = verity_of(&path, &args).unwrap_err();
            assert!(e.contains("would not boot verified"), "{e}");
        }
    }
}
