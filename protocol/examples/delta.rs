//! Make or apply an Outpost delta (a windowed zstd patch, protocol/src/wpatch.rs) from
//! the command line, with timings; used by bench/delta.sh. The base is read by
//! positional reads while applying, as the agent does.
//!
//!   delta make  OLD NEW PATCH [LEVEL]
//!   delta apply OLD PATCH OUT

use std::io::Write;
use std::time::Instant;

use outpost_protocol::codec::{Decode, ImageSink};
use outpost_protocol::wpatch::{make, FileBase};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("make") if args.len() >= 5 => {
            let old = std::fs::read(&args[2])?;
            let new = std::fs::read(&args[3])?;
            let level = args.get(5).map(|l| l.parse()).transpose()?.unwrap_or(19);
            let t = Instant::now();
            let patch = make(&old, &new, level)?;
            let secs = t.elapsed().as_secs_f64();
            std::fs::write(&args[4], &patch)?;
            println!("{{\"op\":\"make\",\"seconds\":{secs:.4},\"patch_bytes\":{},\"level\":{level}}}", patch.len());
        }
        Some("apply") if args.len() == 5 => {
            let file = std::fs::File::open(&args[2])?;
            let old = FileBase { len: file.metadata()?.len(), file };
            let patch = std::fs::read(&args[3])?;
            let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&args[4])?);
            let t = Instant::now();
            let mut d = Decode::windowed(ImageSink::new(out, u64::MAX), &old);
            for chunk in patch.chunks(1 << 16) {
                d.feed(chunk)?;
            }
            let (mut w, sha, len) = d.finish()?;
            w.flush()?;
            let secs = t.elapsed().as_secs_f64();
            println!("{{\"op\":\"apply\",\"seconds\":{secs:.4},\"bytes\":{len},\"sha256\":\"{sha}\"}}");
        }
        _ => {
            eprintln!("usage: delta make OLD NEW PATCH [LEVEL] | delta apply OLD PATCH OUT");
            std::process::exit(2);
        }
    }
    Ok(())
}
