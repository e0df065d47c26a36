//! Builds `../programs` for the BPF target with the nightly toolchain and bpf-linker
//! (both installed by scripts/setup.sh); the object lands in OUT_DIR.
fn main() -> aya_build::Result<()> {
    if std::env::var_os("CARGO_FEATURE_PROGRAMS").is_none() {
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../programs");
    let package = aya_build::Package { name: "outpost-ebpf-programs", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
