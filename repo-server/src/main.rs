use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outpost_server::storage::{Store, TokenRole};
use outpost_server::ServerConfig;

#[derive(Debug, Parser)]
#[command(name = "outpost-server", version, about = "Outpost server: the TUF image repository, pipeline uploads, online re-signing")]
struct Cli {
    /// Configuration file (see docs/examples/server.toml).
    #[arg(long, short, default_value = "/etc/outpost/server.toml")]
    config: PathBuf,
    /// Log filter (error, warn, info, debug, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "OUTPOST_LOG")]
    log_level: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the repository and API until SIGTERM.
    Serve,
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The device CA (client certificates for attested devices).
    #[command(subcommand)]
    DeviceCa(DeviceCaCommand),
}

#[derive(Debug, Subcommand)]
enum DeviceCaCommand {
    /// Make a device CA: a P-256 key (ca.key, mode 0600) and a self-signed CA
    /// certificate (ca.pem) in a new directory; name them in [device_ca]. Like the
    /// director key, make it once, on a machine you trust, and keep the key offline
    /// but for the server.
    Init {
        /// The SPIFFE trust domain devices' certificates name (spiffe://DOMAIN/device/ID).
        #[arg(long)]
        trust_domain: String,
        /// A directory that does not exist yet.
        #[arg(long)]
        out: PathBuf,
        /// How long the CA certificate is valid.
        #[arg(long, default_value = "10y")]
        validity: String,
    },
}

/// `device-ca init`: the pair in a new directory, the key readable by its owner only.
fn device_ca_init(trust_domain: &str, out: &std::path::Path, validity: &str) -> Result<(), outpost_server::ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |reason: String| outpost_server::ServerError::Tls(format!("device-ca init: {reason}"));
    let validity = humantime::parse_duration(validity).map_err(|e| bad(format!("--validity {validity:?}: {e}")))?;
    if trust_domain.is_empty() || !trust_domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)) {
        return Err(bad(format!("--trust-domain {trust_domain:?}: lowercase letters, digits, '-', '.' and '_' only (a SPIFFE trust domain)")));
    }
    if out.exists() {
        return Err(bad(format!("{} exists: give a directory that does not exist yet", out.display())));
    }
    let (cert, key) = outpost_server::make_device_ca(trust_domain, validity, chrono::Utc::now())?;
    // Made whole beside it, then renamed: never a directory with a key and no certificate.
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = out.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir(&partial).map_err(|e| bad(format!("{}: {e}", partial.display())))?;
    let made = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(partial.join("ca.key"))?;
        f.write_all(key.as_bytes())?;
        f.sync_all()?;
        outpost_fsio::write_atomic(&partial.join("ca.pem"), cert.as_bytes())?;
        std::fs::rename(&partial, out)
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(bad(format!("{}: {e}", out.display())));
    }
    println!("{}", out.join("ca.pem").display());
    Ok(())
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it once; only its hash is stored.
    Create {
        #[arg(long)]
        role: TokenRole,
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    let result = (|| -> Result<(), outpost_server::ServerError> {
        if let Command::DeviceCa(DeviceCaCommand::Init { trust_domain, out, validity }) = &cli.command {
            return device_ca_init(trust_domain, out, validity);
        }
        let config = ServerConfig::load(&cli.config)?;
        let rt = tokio::runtime::Runtime::new().map_err(|e| outpost_server::ServerError::io("start runtime", "", e))?;
        match cli.command {
            Command::Serve => rt.block_on(outpost_server::serve(config)),
            Command::Token(TokenCommand::Create { role, name }) => rt.block_on(async {
                let store = Store::open(&config.database).await?;
                println!("{}", store.create_token(&name, role).await?);
                Ok(())
            }),
            Command::DeviceCa(_) => Ok(()),
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", outpost_protocol::display_chain(&e));
            ExitCode::FAILURE
        }
    }
}
