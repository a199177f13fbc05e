//! Mangoo's load generator and upstream stand-in.
//!
//! - `mangoo-bench upstream --bind 127.0.0.1:9200`: an OpenAI-compatible streaming server fast
//!   enough never to be the bottleneck. Each token's text carries its sequence number and the
//!   wall-clock nanosecond it was written, so a client on the same machine measures the latency of
//!   every token end to end.
//! - `mangoo-bench load --target mangoo|direct ...`: opens streams, parses the SSE properly,
//!   verifies every stream's content (every token, in order, once), and reports time to first
//!   token and per-token latency percentiles. `--target direct` is the baseline: the same client
//!   against the stand-in itself.
//!
//! The message sent says how the stand-in answers: `tokens=N rate=R` (R tokens per second per
//! stream; 0 = as fast as possible).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::response::Response;
use axum::routing::post;
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "mangoo-bench",
    about = "Mangoo's load generator and upstream stand-in"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an OpenAI-compatible streaming stand-in.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:9200")]
        bind: SocketAddr,
    },
    /// Open streams and measure them.
    Load(LoadArgs),
}

#[derive(Parser, Clone)]
struct LoadArgs {
    #[arg(long, value_enum)]
    target: Target,
    /// Mangoo's or the stand-in's base URL.
    #[arg(long)]
    url: String,
    /// A Mangoo token (target mangoo); several, comma-separated, spread the streams over that
    /// many users (stream i uses token i mod n).
    #[arg(long, default_value = "")]
    token: String,
    #[arg(long, default_value = "bench")]
    bot: String,
    /// Streams in flight at once.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Tokens per stream.
    #[arg(long, default_value_t = 50)]
    tokens: usize,
    /// Tokens per second per stream (0: as fast as possible).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Keep `streams` answers in flight for this long, starting a new stream whenever one ends
    /// (steady state); without it, each of the `streams` runs once, all starting together.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Read the server's CPU time from /proc before and after (target mangoo).
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Mangoo,
    Direct,
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Upstream { bind } => upstream(bind).await,
        Command::Load(args) => {
            let report = load(&args).await;
            println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            if report["errors"].as_u64() != Some(0) {
                std::process::exit(1);
            }
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

// ---- The stand-in ---------------------------------------------------------------------------

async fn upstream(bind: SocketAddr) {
    let app = axum::Router::new().route("/v1/chat/completions", post(completions));
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    eprintln!(
        "stand-in listening on http://{}",
        listener.local_addr().expect("addr")
    );
    // HTTP/1.1, or HTTP/2 with prior knowledge with no cap on streams per connection, so a
    // client multiplexing every answer onto one connection is never held back here.
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(None);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (builder, app) = (builder.clone(), app.clone());
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

/// `tokens=N rate=R` from the last message.
fn parse_plan(body: &Value) -> (usize, f64) {
    let text = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default();
    let mut plan = (50, 20.0);
    for part in text.split_whitespace() {
        if let Some(n) = part.strip_prefix("tokens=") {
            plan.0 = n.parse().unwrap_or(plan.0);
        } else if let Some(r) = part.strip_prefix("rate=") {
            plan.1 = r.parse().unwrap_or(plan.1);
        }
    }
    plan
}

async fn completions(Json(body): Json<Value>) -> Response {
    let (tokens, rate) = parse_plan(&body);
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let frames = async_stream::stream! {
        let started = tokio::time::Instant::now();
        for seq in 0..tokens {
            if let Some(interval) = interval {
                tokio::time::sleep_until(started + interval * seq as u32).await;
            }
            let chunk = json!({"choices": [{"index": 0, "delta": {"content": format!(" {seq}:{}", now_ns())}, "finish_reason": null}]});
            yield Ok::<_, std::convert::Infallible>(Bytes::from(format!("data: {chunk}\n\n")));
        }
        let end = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": tokens}});
        yield Ok(Bytes::from(format!("data: {end}\n\ndata: [DONE]\n\n")));
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(frames))
        .expect("response")
}

// ---- The load generator ---------------------------------------------------------------------

#[derive(Default)]
struct StreamResult {
    /// Until the response's headers arrived.
    first_byte: Option<Duration>,
    first_token: Option<Duration>,
    token_latencies_ns: Vec<u64>,
    error: Option<String>,
}

async fn load(args: &LoadArgs) -> Value {
    mangoo::crypto::install_default_providers();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.streams)
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let cpu_before = args.server_pid.map(cpu_seconds);
    let started = Instant::now();
    let until = args
        .duration_secs
        .map(|secs| started + Duration::from_secs_f64(secs));
    let progress = Arc::new(Progress {
        server_pid: args.server_pid,
        rss_before_kib: args.server_pid.map(rss_kib),
        ..Progress::default()
    });
    let tokens: Vec<&str> = args.token.split(',').collect();
    let workers = (0..args.streams).map(|i| {
        worker(
            &client,
            args,
            tokens[i % tokens.len()],
            until,
            progress.clone(),
        )
    });
    let results: Vec<StreamResult> = futures_util::future::join_all(workers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let elapsed = started.elapsed();
    let cpu = match (cpu_before, args.server_pid.map(cpu_seconds)) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    report(args, &results, elapsed, &progress, cpu)
}

/// What all streams share: tokens counted, and the server's memory once every stream is open.
#[derive(Default)]
struct Progress {
    server_pid: Option<u32>,
    relayed: AtomicU64,
    /// Streams that have their first token.
    answering: AtomicU64,
    rss_before_kib: Option<u64>,
    rss_all_open_kib: std::sync::OnceLock<u64>,
}

impl Progress {
    fn first_token(&self, streams: usize) {
        if self.answering.fetch_add(1, Ordering::SeqCst) + 1 == streams as u64
            && let Some(pid) = self.server_pid
        {
            let _ = self.rss_all_open_kib.set(rss_kib(pid));
        }
    }
}

/// One stream, or (with a duration) one stream after another until the time is up: the steady
/// state of `streams` answers in flight, where new streams start while others are mid-answer.
async fn worker(
    client: &reqwest::Client,
    args: &LoadArgs,
    token: &str,
    until: Option<Instant>,
    progress: Arc<Progress>,
) -> Vec<StreamResult> {
    let mut results = vec![one_stream(client, args, token, &progress).await];
    while until.is_some_and(|until| Instant::now() < until) {
        results.push(one_stream(client, args, token, &progress).await);
    }
    results
}

async fn one_stream(
    client: &reqwest::Client,
    args: &LoadArgs,
    token: &str,
    progress: &Progress,
) -> StreamResult {
    let message = format!("tokens={} rate={}", args.tokens, args.rate);
    let request = match args.target {
        Target::Mangoo => client
            .post(format!("{}/api/v1/chat/stream", args.url))
            .bearer_auth(token)
            .json(&json!({"bot_id": args.bot, "message": message})),
        Target::Direct => client
            .post(format!("{}/v1/chat/completions", args.url))
            .json(&json!({"model": "bench", "stream": true, "messages": [{"role": "user", "content": message}]})),
    };
    let sent = Instant::now();
    let mut result = StreamResult::default();
    let response = match request.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            result.error = Some(format!("HTTP {}", r.status()));
            return result;
        }
        Err(e) => {
            result.error = Some(e.to_string());
            return result;
        }
    };
    result.first_byte = Some(sent.elapsed());
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut expected = 0usize;
    let mut finished = false;
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            result.error = Some("the stream broke".into());
            return result;
        };
        let received = now_ns();
        buffer.extend_from_slice(&chunk);
        let mut consumed = 0;
        while let Some(end) = find_blank_line(&buffer[consumed..]) {
            let block = &buffer[consumed..consumed + end];
            consumed += end + 2;
            match token_of(block, args.target) {
                Token::Text(seq, ts) => {
                    if seq != expected {
                        result.error = Some(format!("token {seq} where {expected} was due"));
                        return result;
                    }
                    expected += 1;
                    if result.first_token.is_none() {
                        result.first_token = Some(sent.elapsed());
                        progress.first_token(args.streams);
                    }
                    result.token_latencies_ns.push(received.saturating_sub(ts));
                    progress.relayed.fetch_add(1, Ordering::Relaxed);
                }
                Token::End => finished = true,
                Token::Failed(error) => {
                    result.error = Some(error);
                    return result;
                }
                Token::Other => {}
            }
        }
        buffer.drain(..consumed);
    }
    if !finished || expected != args.tokens {
        result.error = Some(format!("ended after {expected} of {} tokens", args.tokens));
    }
    result
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\n\n")
}

enum Token {
    /// A token's sequence number and the nanosecond the stand-in wrote it.
    Text(usize, u64),
    End,
    Failed(String),
    Other,
}

#[derive(serde::Deserialize)]
struct MangooMessage<'a> {
    #[serde(borrow)]
    content: std::borrow::Cow<'a, str>,
}

#[derive(serde::Deserialize)]
struct DirectChunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<DirectChoice<'a>>,
}

#[derive(serde::Deserialize)]
struct DirectChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<DirectDelta<'a>>,
}

#[derive(serde::Deserialize)]
struct DirectDelta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// One SSE block: Mangoo's `message`/`done`/`error` events, or the stand-in's chunks. Parsed
/// without copies: the client shares the machine with the server it measures.
fn token_of(block: &[u8], target: Target) -> Token {
    let mut event: &[u8] = b"message";
    let mut data: &[u8] = b"";
    for line in block.split(|b| *b == b'\n') {
        if let Some(name) = line.strip_prefix(b"event: ") {
            event = name;
        } else if let Some(d) = line.strip_prefix(b"data: ") {
            data = d;
        }
    }
    if data.is_empty() {
        return Token::Other; // heartbeat comments
    }
    let text = match target {
        Target::Mangoo => match event {
            b"message" => serde_json::from_slice::<MangooMessage>(data)
                .ok()
                .map(|m| m.content),
            b"done" => return Token::End,
            b"error" => return Token::Failed(String::from_utf8_lossy(data).into_owned()),
            _ => return Token::Other,
        },
        Target::Direct => {
            if data == b"[DONE]" {
                return Token::End;
            }
            match serde_json::from_slice::<DirectChunk>(data) {
                Ok(chunk) => match chunk.choices.into_iter().next().and_then(|c| c.delta) {
                    Some(DirectDelta {
                        content: Some(text),
                    }) => Some(text),
                    _ => return Token::Other,
                },
                Err(_) => None,
            }
        }
    };
    match text.as_deref().and_then(parse_token) {
        Some((seq, ts)) => Token::Text(seq, ts),
        None => Token::Failed(format!(
            "unexpected data {:?}",
            String::from_utf8_lossy(data)
        )),
    }
}

/// ` seq:timestamp_ns`.
fn parse_token(text: &str) -> Option<(usize, u64)> {
    let (seq, ts) = text.trim().split_once(':')?;
    Some((seq.parse().ok()?, ts.parse().ok()?))
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index] as f64
}

/// p50, p99 and max of some durations in nanoseconds, in microseconds.
fn summary(mut values: Vec<u64>) -> Value {
    values.sort_unstable();
    let us = |ns: f64| (ns / 1000.0 * 10.0).round() / 10.0;
    json!({
        "p50": us(percentile(&values, 0.5)),
        "p99": us(percentile(&values, 0.99)),
        "max": us(values.last().copied().unwrap_or_default() as f64),
    })
}

fn report(
    args: &LoadArgs,
    results: &[StreamResult],
    elapsed: Duration,
    progress: &Progress,
    cpu: Option<f64>,
) -> Value {
    let tokens = progress.relayed.load(Ordering::Relaxed);
    let rss_open = progress.rss_all_open_kib.get().copied();
    let per_stream = match (progress.rss_before_kib, rss_open) {
        (Some(before), Some(open)) => {
            Some((open.saturating_sub(before) as f64 / args.streams as f64 * 10.0).round() / 10.0)
        }
        _ => None,
    };
    let errors: Vec<&str> = results.iter().filter_map(|r| r.error.as_deref()).collect();
    let nanos = |d: &Duration| d.as_nanos() as u64;
    let first_byte = results
        .iter()
        .filter_map(|r| r.first_byte.as_ref())
        .map(nanos);
    let first_token = results
        .iter()
        .filter_map(|r| r.first_token.as_ref())
        .map(nanos);
    let latencies = results
        .iter()
        .flat_map(|r| r.token_latencies_ns.iter().copied());
    json!({
        "target": match args.target { Target::Mangoo => "mangoo", Target::Direct => "direct" },
        "streams_in_flight": args.streams,
        "streams_run": results.len(),
        "tokens_per_stream": args.tokens,
        "rate_per_stream": args.rate,
        "errors": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "elapsed_s": elapsed.as_secs_f64(),
        "tokens_relayed": tokens,
        "tokens_per_s": tokens as f64 / elapsed.as_secs_f64(),
        "first_byte_us": summary(first_byte.collect()),
        "first_token_us": summary(first_token.collect()),
        "token_latency_us": summary(latencies.collect()),
        "server_cpu_s": cpu,
        "server_cpu_s_per_million_tokens": cpu.map(|c| c / tokens.max(1) as f64 * 1e6),
        "server_rss_kib": {"before": progress.rss_before_kib, "all_streams_open": rss_open},
        "server_kib_per_open_stream": per_stream,
    })
}
