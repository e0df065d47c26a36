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
        let config = ServerConfig::load(&cli.config)?;
        let rt = tokio::runtime::Runtime::new().map_err(|e| outpost_server::ServerError::io("start runtime", "", e))?;
        match cli.command {
            Command::Serve => rt.block_on(outpost_server::serve(config)),
            Command::Token(TokenCommand::Create { role, name }) => rt.block_on(async {
                let store = Store::open(&config.database).await?;
                println!("{}", store.create_token(&name, role).await?);
                Ok(())
            }),
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
