//! The chaos suite's client (`scripts/chaos.sh` drives it, one run per fault phase).
//!
//! `mangoo-chaos --url http://lb --token T --conversations 20 --duration-secs 20` keeps that
//! many conversations going through the load balancer, each one turn after another in one chat,
//! as a browser's EventSource would: a dropped stream is resumed with `Last-Event-ID` (backoff
//! 100 ms → 2 s), a `503` start is tried again after its `Retry-After`. Every turn is checked:
//! - ids strictly increasing by one from `start` (no duplicate, no gap), exactly one terminal
//!   event and nothing after it;
//! - a `done` answer holds every token the upstream stand-in sent, in order (its tokens carry
//!   their sequence numbers: `tokens=N rate=R` in the message asks for them);
//! - storage holds exactly the received text with the status the terminal event implies, and
//!   no answer stays `streaming`;
//! - the chat takes the next turn.
//!
//! Prints one JSON line of counts; exits non-zero when any check failed.

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[derive(Parser, Clone)]
#[command(name = "mangoo-chaos", about = "Conversations that check every event")]
struct Args {
    #[arg(long)]
    url: String,
    /// Comma-separated tokens: conversation i uses token i mod n.
    #[arg(long)]
    token: String,
    #[arg(long, default_value = "bench")]
    bot: String,
    #[arg(long, default_value_t = 20)]
    conversations: usize,
    #[arg(long, default_value_t = 20.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 100)]
    tokens: usize,
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long one turn may take to reach its terminal event, resumes included, before it
    /// counts as hung.
    #[arg(long, default_value_t = 90.0)]
    hang_secs: f64,
}

/// What one turn came to.
#[derive(Default, Debug)]
struct Turn {
    events: Vec<Event>,
    resumes: u32,
    refused_503: u32,
    lb_refusals: u32,
    server_errors: u32,
    /// The first check that failed, if any.
    failure: Option<String>,
    hung: bool,
}

#[derive(Debug, Clone)]
struct Event {
    id: i64,
    name: String,
    data: Value,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    mangoo::crypto::install_default_providers();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let until = Instant::now() + Duration::from_secs_f64(args.duration_secs);
    let tokens: Vec<String> = args.token.split(',').map(str::to_owned).collect();
    let conversations = (0..args.conversations).map(|i| {
        let (client, args, token) = (
            client.clone(),
            args.clone(),
            tokens[i % tokens.len()].clone(),
        );
        async move { conversation(&client, &args, &token, until).await }
    });
    let turns: Vec<Turn> = futures_util::future::join_all(conversations)
        .await
        .into_iter()
        .flatten()
        .collect();
    let summary = summarize(&turns);
    println!("{summary}");
    let clean = ["failed", "hung", "server_errors_5xx_other_than_503"]
        .iter()
        .all(|key| summary[key].as_u64() == Some(0));
    if !clean {
        std::process::exit(1);
    }
}

/// One chat, one turn after another until the time is up.
async fn conversation(
    client: &reqwest::Client,
    args: &Args,
    token: &str,
    until: Instant,
) -> Vec<Turn> {
    let mut chat_id: Option<String> = None;
    let mut turns = Vec::new();
    while Instant::now() < until {
        let mut turn = run_turn(client, args, token, chat_id.as_deref()).await;
        if turn.failure.is_none() && !turn.hung {
            check_turn(args, &mut turn);
        }
        if turn.failure.is_none() && !turn.hung {
            let id = turn.events[0].data["chat_id"].as_str().map(str::to_owned);
            chat_id = chat_id.or(id);
            let stored = stored_answer(client, args, token, chat_id.as_deref().unwrap_or("")).await;
            check_stored(&mut turn, stored);
        }
        let stop = turn.hung || turn.failure.is_some();
        turns.push(turn);
        if stop {
            break; // a broken chat is reported, not hammered
        }
    }
    turns
}

/// Starts a turn and follows it to its terminal event, resuming as often as it takes.
async fn run_turn(client: &reqwest::Client, args: &Args, token: &str, chat: Option<&str>) -> Turn {
    let mut turn = Turn::default();
    let deadline = Instant::now() + Duration::from_secs_f64(args.hang_secs);
    let mut backoff = Duration::from_millis(100);
    let mut chat_id = chat.map(str::to_owned);
    loop {
        if Instant::now() > deadline {
            turn.hung = true;
            return turn;
        }
        let request = match (&chat_id, turn.events.last()) {
            (Some(chat), Some(last)) => client
                .get(format!("{}/api/v1/chats/{chat}/stream", args.url))
                .header("last-event-id", last.id.to_string()),
            _ => {
                let mut body = json!({"bot_id": args.bot,
                    "message": format!("tokens={} rate={}", args.tokens, args.rate)});
                if let Some(chat) = &chat_id {
                    body["chat_id"] = json!(chat);
                }
                client
                    .post(format!("{}/api/v1/chat/stream", args.url))
                    .json(&body)
            }
        };
        match request.bearer_auth(token).send().await {
            Ok(response) if response.status() == 200 => {
                let ended = read_stream(response, &mut turn).await;
                if chat_id.is_none() {
                    chat_id = turn
                        .events
                        .first()
                        .and_then(|e| e.data["chat_id"].as_str().map(str::to_owned));
                }
                if ended || turn.failure.is_some() {
                    return turn;
                }
                turn.resumes += 1;
            }
            Ok(response) if response.status() == 503 => {
                let header =
                    |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
                let from_mangoo =
                    header("content-type").is_some_and(|t| t.starts_with("application/json"));
                let retry_after = header("retry-after").and_then(|v| v.parse::<u64>().ok());
                if !from_mangoo {
                    turn.lb_refusals += 1; // the load balancer has no ready instance
                } else if retry_after.is_none() {
                    turn.failure = Some("Mangoo's 503 without Retry-After".into());
                    return turn;
                } else {
                    turn.refused_503 += 1;
                }
            }
            Ok(response) if response.status().is_server_error() => turn.server_errors += 1,
            Ok(response)
                if turn.events.is_empty() && chat_id.is_some() && response.status() == 409 =>
            {
                // The chat's previous answer is still being concluded elsewhere: ask again.
            }
            Ok(response) => {
                turn.failure = Some(format!(
                    "HTTP {} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                ));
                return turn;
            }
            Err(_) => {} // the load balancer or an instance is away: try again
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Reads events into the turn until the stream ends; true when the terminal event came and the
/// stream then closed with nothing after it.
async fn read_stream(response: reqwest::Response, turn: &mut Turn) -> bool {
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut terminal = turn.events.last().is_some_and(is_terminal);
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { return false };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(event) = parse_block(&block) else {
                continue;
            };
            if terminal {
                turn.failure = Some(format!("an event after the terminal: {}", event.name));
                return true;
            }
            terminal = is_terminal(&event);
            turn.events.push(event);
        }
    }
    terminal
}

fn is_terminal(event: &Event) -> bool {
    event.name == "done" || event.name == "error"
}

/// One SSE block; `None` for comments (heartbeats).
fn parse_block(block: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(block);
    let (mut id, mut name, mut data) = (None, "message".to_owned(), None);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("event: ") {
            name = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = serde_json::from_str(v).ok();
        }
    }
    Some(Event {
        id: id?,
        name,
        data: data?,
    })
}

/// The event-level checks: ids, one terminal, every token of a `done` answer.
fn check_turn(args: &Args, turn: &mut Turn) {
    let events = &turn.events;
    turn.failure = if events.first().is_none_or(|e| e.name != "start") {
        Some(format!("no start event first: {:?}", events.first()))
    } else if let Some(pair) = events.windows(2).find(|w| w[1].id != w[0].id + 1) {
        Some(format!(
            "id {} after {}: a gap or a duplicate",
            pair[1].id, pair[0].id
        ))
    } else if events.iter().filter(|e| is_terminal(e)).count() != 1 {
        Some("not exactly one terminal event".into())
    } else if events
        .last()
        .is_some_and(|e| e.name == "done" && e.data["stopped"] != true)
        && text_of(events) != expected_text(args.tokens)
    {
        Some(format!(
            "done, but the text differs from the model's: {:?}",
            text_of(events)
        ))
    } else {
        None
    };
}

/// The stand-in's tokens carry `seq:timestamp`; only the sequence numbers are compared.
fn expected_text(tokens: usize) -> String {
    (0..tokens)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn text_of(events: &[Event]) -> String {
    let content: String = events
        .iter()
        .filter(|e| e.name == "message")
        .filter_map(|e| e.data["content"].as_str())
        .collect();
    sequence_of(&content)
}

fn sequence_of(content: &str) -> String {
    content
        .split_whitespace()
        .filter_map(|t| t.split_once(':').map(|(seq, _)| seq.to_owned()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The chat's last message once it is no longer `streaming` (a late write may take a while
/// after an outage; `None` after the hang limit).
async fn stored_answer(
    client: &reqwest::Client,
    args: &Args,
    token: &str,
    chat: &str,
) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.hang_secs);
    while Instant::now() < deadline {
        let url = format!("{}/api/v1/chats/{chat}/messages?limit=1000", args.url);
        if let Ok(response) = client.get(url).bearer_auth(token).send().await
            && response.status() == 200
            && let Ok(body) = response.json::<Value>().await
            && let Some(last) = body["messages"].as_array().and_then(|m| m.last()).cloned()
            && last["status"] != "streaming"
        {
            return Some(last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Storage holds what was received, with the status the terminal event implies.
fn check_stored(turn: &mut Turn, stored: Option<Value>) {
    let Some(stored) = stored else {
        turn.failure = Some("the answer was left streaming".into());
        return;
    };
    let terminal = turn.events.last().expect("checked");
    let expected_status = match (terminal.name.as_str(), terminal.data["code"].as_str()) {
        ("done", _) if terminal.data["stopped"] == true => "stopped",
        ("done", _) => "complete",
        (_, Some("answer_interrupted")) => "interrupted",
        _ => "error",
    };
    let received = text_of(&turn.events);
    let held = sequence_of(stored["content"].as_str().unwrap_or_default());
    if stored["status"] != expected_status || held != received {
        turn.failure = Some(format!(
            "stored {} ({} tokens) where {expected_status} ({} tokens) was received",
            stored["status"],
            held.split(',').filter(|s| !s.is_empty()).count(),
            received.split(',').filter(|s| !s.is_empty()).count()
        ));
    }
}

fn summarize(turns: &[Turn]) -> Value {
    let count = |f: &dyn Fn(&Turn) -> bool| turns.iter().filter(|t| f(t)).count();
    let ended = |name: &str, code: Option<&str>| {
        count(&|t| {
            t.events.last().is_some_and(|e| {
                e.name == name && (code.is_none() || e.data["code"].as_str() == code)
            })
        })
    };
    let failures: Vec<&str> = turns
        .iter()
        .filter_map(|t| t.failure.as_deref())
        .take(5)
        .collect();
    json!({
        "turns": turns.len(),
        "events": turns.iter().map(|t| t.events.len()).sum::<usize>(),
        "done": ended("done", None),
        "stopped": count(&|t| t.events.last().is_some_and(|e| e.name == "done" && e.data["stopped"] == true)),
        "interrupted": ended("error", Some("answer_interrupted")),
        "other_errors": count(&|t| t.events.last().is_some_and(|e| e.name == "error" && e.data["code"] != "answer_interrupted")),
        "resumes": turns.iter().map(|t| t.resumes).sum::<u32>(),
        "refused_503": turns.iter().map(|t| t.refused_503).sum::<u32>(),
        "load_balancer_503": turns.iter().map(|t| t.lb_refusals).sum::<u32>(),
        "server_errors_5xx_other_than_503": turns.iter().map(|t| t.server_errors).sum::<u32>(),
        "hung": count(&|t| t.hung),
        "failed": count(&|t| t.failure.is_some()),
        "first_failures": failures,
    })
}
