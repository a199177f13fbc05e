//! The client side of Mangoo's streams, for `mangoo probe` and `mangoo chat`: every event and
//! heartbeat with the moment its last byte arrived, so what a path held back shows as events
//! arriving together.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

/// The base URL API paths are joined to: `url` as the user gave it (a path prefix is kept), with
/// a trailing slash so `join("api/v1/...")` stays under the prefix.
pub fn api_base(url: &str) -> Result<reqwest::Url, String> {
    let mut base = reqwest::Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "http" || u.scheme() == "https")
        .ok_or_else(|| format!("{url} is not an http(s) URL"))?;
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    Ok(base)
}

/// The HTTP client of the command-line tools (TLS on the process's ring provider).
pub fn api_client() -> reqwest::Client {
    crate::crypto::install_default_providers();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("a reqwest client with static settings builds")
}

/// One event as it arrived.
#[derive(Debug, Clone)]
pub struct Arrived {
    pub id: Option<i64>,
    pub event: String,
    pub data: String,
    pub at: Instant,
}

/// What a stream brought, and how it ended.
#[derive(Debug, Default)]
pub struct Reading {
    pub events: Vec<Arrived>,
    pub heartbeats: Vec<Instant>,
    /// `None`: ended cleanly (after `done` or `error`, or when asked to stop early).
    pub cut: Option<String>,
}

impl Reading {
    pub fn messages(&self) -> impl Iterator<Item = &Arrived> {
        self.events.iter().filter(|e| e.event == "message")
    }

    pub fn finished(&self) -> bool {
        self.events
            .last()
            .is_some_and(|e| e.event == "done" || e.event == "error")
    }

    /// When anything (an event or a heartbeat) last arrived.
    pub fn last_arrival(&self) -> Option<Instant> {
        let event = self.events.last().map(|e| e.at);
        let ping = self.heartbeats.last().copied();
        event.max(ping)
    }
}

/// One thing a stream brought.
#[derive(Debug)]
pub enum Received {
    Event(Arrived),
    Heartbeat(Instant),
}

/// Reads a response's SSE frames as they arrive, each stamped with its arrival.
pub struct EventReader {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    ready: std::collections::VecDeque<Received>,
}

impl EventReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
            ready: Default::default(),
        }
    }

    /// The next event or heartbeat; `None` at the end of the body, `Err` when the connection
    /// failed.
    pub async fn next(&mut self) -> Option<Result<Received, String>> {
        loop {
            if let Some(received) = self.ready.pop_front() {
                return Some(Ok(received));
            }
            let chunk = match self.body.next().await? {
                Ok(chunk) => chunk,
                Err(e) => return Some(Err(format!("the connection failed: {e}"))),
            };
            let at = Instant::now();
            self.buffer
                .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                parse_block(&block, at, &mut self.ready);
            }
        }
    }
}

/// Reads `response` until its terminal event, `stop_after` message events, the end of the body
/// or `deadline`, whichever comes first.
pub async fn read(
    response: reqwest::Response,
    stop_after: Option<usize>,
    deadline: Duration,
) -> Reading {
    let mut reading = Reading::default();
    let mut reader = EventReader::new(response);
    let give_up = Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(give_up, reader.next()).await {
            Err(_) => {
                reading.cut = Some(format!("no end within {} s", deadline.as_secs()));
                return reading;
            }
            Ok(None) => {
                if !reading.finished() {
                    reading.cut = Some("the connection closed before the stream's end".into());
                }
                return reading;
            }
            Ok(Some(Err(e))) => {
                reading.cut = Some(e);
                return reading;
            }
            Ok(Some(Ok(Received::Heartbeat(at)))) => reading.heartbeats.push(at),
            Ok(Some(Ok(Received::Event(event)))) => reading.events.push(event),
        }
        let enough = stop_after.is_some_and(|n| reading.messages().count() >= n);
        if reading.finished() || enough {
            return reading;
        }
    }
}

fn parse_block(block: &str, at: Instant, ready: &mut std::collections::VecDeque<Received>) {
    let mut event = Arrived {
        id: None,
        event: "message".into(),
        data: String::new(),
        at,
    };
    let mut fields = 0;
    for line in block.lines() {
        if line.is_empty() {
            continue;
        }
        if line.starts_with(':') {
            ready.push_back(Received::Heartbeat(at));
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        fields += 1;
        match field {
            "id" => event.id = value.parse().ok(),
            "event" => event.event = value.to_owned(),
            "data" => {
                if !event.data.is_empty() {
                    event.data.push('\n');
                }
                event.data.push_str(value);
            }
            _ => {}
        }
    }
    if fields > 0 && !event.data.is_empty() {
        ready.push_back(Received::Event(event));
    }
}
