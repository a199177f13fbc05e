//! `mangoo chat URL`: talk to any Mangoo from a terminal. The answer is printed as it streams;
//! Ctrl-C stops it (the stop endpoint: the model stops too) and a second Ctrl-C quits; a dropped
//! connection is resumed by itself with `Last-Event-ID`; line editing and history are
//! rustyline's. `--message` asks one question and exits, for scripts.
//!
//! Exit codes: 0 every answer completed; 1 an answer failed or the server refused the request;
//! 2 the command could not run (bad URL, no token, the connection); 130 stopped by Ctrl-C.

use std::io::Write;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::sse_client::{EventReader, Received, api_base, api_client};

/// Resumes tried after a dropped connection before giving up, with doubling waits.
const MAX_RESUMES: u32 = 6;

#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub url: String,
    pub token: String,
    pub bot: Option<String>,
    pub chat: Option<String>,
    pub message: Option<String>,
}

/// How a session ended, as an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed = 0,
    Failed = 1,
    Unusable = 2,
    Interrupted = 130,
}

/// How one answer ended.
enum Ending {
    Done,
    /// Stopped by Ctrl-C (the stop endpoint); the partial answer is stored.
    Stopped,
    Failed,
    /// The user pressed Ctrl-C twice: quit.
    Quit,
}

struct Session {
    base: reqwest::Url,
    client: reqwest::Client,
    token: String,
    bot: String,
    chat: Option<String>,
}

pub fn main(options: ChatOptions) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return unusable(&format!("cannot start the runtime: {e}")),
    };
    let mut session = match runtime.block_on(Session::open(&options)) {
        Ok(session) => session,
        Err((outcome, message)) => {
            eprintln!("error: {message}");
            return outcome;
        }
    };
    match options.message {
        Some(message) => match runtime.block_on(session.ask(&message)) {
            Ending::Done => Outcome::Completed,
            Ending::Failed => Outcome::Failed,
            Ending::Stopped | Ending::Quit => Outcome::Interrupted,
        },
        None => interactive(&runtime, &mut session),
    }
}

fn unusable(message: &str) -> Outcome {
    eprintln!("error: {message}");
    Outcome::Unusable
}

/// The prompt loop. rustyline reads in raw mode, so Ctrl-C at the prompt arrives as a key, not
/// a signal: the first clears the line, a second on an empty line quits.
fn interactive(runtime: &tokio::runtime::Runtime, session: &mut Session) -> Outcome {
    use rustyline::error::ReadlineError;
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(editor) => editor,
        Err(e) => return unusable(&format!("cannot read the terminal: {e}")),
    };
    let history = history_file();
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    eprintln!(
        "Talking to {} at {}. Ctrl-C stops an answer; Ctrl-D (or Ctrl-C twice) quits.",
        session.bot, session.base
    );
    let mut outcome = Outcome::Completed;
    let mut interrupted = false;
    loop {
        match editor.readline("you> ") {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => {
                interrupted = false;
                let _ = editor.add_history_entry(line.as_str());
                match runtime.block_on(session.ask(&line)) {
                    Ending::Done | Ending::Stopped => {}
                    Ending::Failed => outcome = Outcome::Failed,
                    Ending::Quit => {
                        outcome = Outcome::Interrupted;
                        break;
                    }
                }
            }
            Err(ReadlineError::Interrupted) if !interrupted => {
                interrupted = true;
                eprintln!("(Ctrl-C again or Ctrl-D to quit)");
            }
            Err(ReadlineError::Interrupted) | Err(ReadlineError::Eof) => break,
            Err(e) => return unusable(&format!("cannot read the terminal: {e}")),
        }
    }
    if let Some(path) = &history {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(path);
    }
    outcome
}

fn history_file() -> Option<std::path::PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/share"))
        })?;
    Some(data.join("mangoo").join("chat_history"))
}

impl Session {
    /// Checks the URL and the token, and picks the bot (the first listed unless `--bot`).
    async fn open(options: &ChatOptions) -> Result<Self, (Outcome, String)> {
        let base = api_base(&options.url).map_err(|problem| (Outcome::Unusable, problem))?;
        let client = api_client();
        let mut session = Self {
            base,
            client,
            token: options.token.clone(),
            bot: options.bot.clone().unwrap_or_default(),
            chat: options.chat.clone(),
        };
        let bots = session
            .client
            .get(session.url("api/v1/bots"))
            .bearer_auth(&session.token)
            .send()
            .await
            .map_err(|e| {
                (
                    Outcome::Unusable,
                    format!("cannot reach {}: {e}", session.base),
                )
            })?;
        if !bots.status().is_success() {
            return Err((Outcome::Failed, refusal(bots).await));
        }
        let listed: Value = bots.json().await.unwrap_or_default();
        if session.bot.is_empty() {
            session.bot = listed["bots"][0]["id"]
                .as_str()
                .ok_or((Outcome::Failed, "the server has no bots".to_owned()))?
                .to_owned();
        }
        Ok(session)
    }

    fn url(&self, path: &str) -> reqwest::Url {
        self.base.join(path).expect("relative API paths join")
    }

    /// Asks `message` and prints the answer as it streams, resuming after a dropped connection.
    async fn ask(&mut self, message: &str) -> Ending {
        let mut body = json!({"bot_id": self.bot, "message": message});
        if let Some(chat) = &self.chat {
            body["chat_id"] = json!(chat);
        }
        let request = self
            .client
            .post(self.url("api/v1/chat/stream"))
            .bearer_auth(&self.token)
            .json(&body);
        let mut last_id = None;
        let mut stops = 0;
        let mut response = request.send().await;
        let mut resumes = 0;
        loop {
            match response {
                Ok(r) if r.status() == StatusCode::OK => {
                    if let Some(ending) = self.follow(r, &mut last_id, &mut stops).await {
                        return ending;
                    }
                    // The connection dropped: resume below.
                }
                Ok(r) if r.status() == StatusCode::NO_CONTENT => return Ending::Done,
                Ok(r) => {
                    eprintln!("\nerror: {}", refusal(r).await);
                    return Ending::Failed;
                }
                Err(e) if last_id.is_none() => {
                    eprintln!("\nerror: cannot reach {}: {e}", self.base);
                    return Ending::Failed;
                }
                Err(_) => {}
            }
            resumes += 1;
            let Some(chat) = self.chat.clone().filter(|_| resumes <= MAX_RESUMES) else {
                eprintln!("\nerror: the connection keeps dropping");
                return Ending::Failed;
            };
            eprint!("\n[reconnecting...]\n");
            tokio::time::sleep(Duration::from_millis(250 << resumes.min(5))).await;
            let mut resume = self
                .client
                .get(self.url(&format!("api/v1/chats/{chat}/stream")))
                .bearer_auth(&self.token);
            if let Some(id) = last_id {
                resume = resume.header("last-event-id", id.to_string());
            }
            response = resume.send().await;
        }
    }

    /// Prints one response's events; `None` when the connection dropped before the end.
    async fn follow(
        &mut self,
        response: reqwest::Response,
        last_id: &mut Option<i64>,
        stops: &mut u32,
    ) -> Option<Ending> {
        let mut reader = EventReader::new(response);
        let mut stdout = std::io::stdout();
        // One listener for the whole answer: a Ctrl-C between two events is kept, not lost.
        let mut interrupts =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        loop {
            let interrupted = async {
                match interrupts.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let received = tokio::select! {
                received = reader.next() => received,
                _ = interrupted => {
                    *stops += 1;
                    if *stops > 1 {
                        eprintln!("\n[quit]");
                        return Some(Ending::Quit);
                    }
                    self.stop().await;
                    continue;
                }
            };
            let event = match received {
                None | Some(Err(_)) => return None,
                Some(Ok(Received::Heartbeat(_))) => continue,
                Some(Ok(Received::Event(event))) => event,
            };
            if event.id.is_some() {
                *last_id = event.id;
            }
            let data: Value = serde_json::from_str(&event.data).unwrap_or_default();
            match event.event.as_str() {
                "start" => self.chat = data["chat_id"].as_str().map(str::to_owned),
                "message" => {
                    let _ = write!(stdout, "{}", data["content"].as_str().unwrap_or_default());
                    let _ = stdout.flush();
                }
                "done" => {
                    let stopped = data["stopped"].as_bool().unwrap_or(false);
                    println!("{}", if stopped { "\n[stopped]" } else { "" });
                    return Some(if stopped {
                        Ending::Stopped
                    } else {
                        Ending::Done
                    });
                }
                "error" => {
                    println!();
                    eprintln!(
                        "error: {}",
                        data["error"].as_str().unwrap_or("the answer failed")
                    );
                    return Some(Ending::Failed);
                }
                _ => {}
            }
        }
    }

    /// The stop endpoint: the model stops too, and the stream ends with `done` (stopped).
    async fn stop(&self) {
        let Some(chat) = &self.chat else { return };
        eprint!("\n[stopping... Ctrl-C again to quit]\n");
        let stopped = self
            .client
            .post(self.url(&format!("api/v1/chats/{chat}/stop")))
            .bearer_auth(&self.token)
            .send()
            .await;
        if let Err(e) = stopped {
            eprintln!("error: could not stop the answer: {e}");
        }
    }
}

/// The server's reason for refusing a request, from the contract's error body.
async fn refusal(response: reqwest::Response) -> String {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    let reason = body["error"].as_str().unwrap_or("no reason given");
    match status {
        StatusCode::UNAUTHORIZED => format!("401: {reason} (pass --token or set MANGOO_TOKEN)"),
        _ => format!("{status}: {reason}"),
    }
}
