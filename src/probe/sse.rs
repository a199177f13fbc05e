//! Reading a stream the way `mangoo probe` needs it: every event and heartbeat with the moment
//! its last byte arrived, so what the path held back shows as events arriving together.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

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

/// Reads `response` until its terminal event, `stop_after` message events, the end of the body
/// or `deadline`, whichever comes first.
pub async fn read(
    response: reqwest::Response,
    stop_after: Option<usize>,
    deadline: Duration,
) -> Reading {
    let mut reading = Reading::default();
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let give_up = Instant::now() + deadline;
    loop {
        let chunk = match tokio::time::timeout_at(give_up, body.next()).await {
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
                reading.cut = Some(format!("the connection failed: {e}"));
                return reading;
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        let at = Instant::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            parse_block(&block, at, &mut reading);
        }
        let enough = stop_after.is_some_and(|n| reading.messages().count() >= n);
        if reading.finished() || enough {
            return reading;
        }
    }
}

fn parse_block(block: &str, at: Instant, reading: &mut Reading) {
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
            reading.heartbeats.push(at);
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
        reading.events.push(event);
    }
}
