//! # Mangoo
//!
//! A real-time LLM chat streaming server: a user's message goes in, the model's answer streams
//! back token by token as Server-Sent Events, with nothing buffered, lost or duplicated, and no
//! user ever seeing another user's chats.
//!
//! ## Layout
//!
//! One request flows left to right; storage sits beside the chat service:
//!
//! ```text
//! client ─▶ http (routes, extract: auth + body) ─▶ chat::ChatService ─▶ providers::Provider
//!                                                     │   └─▶ store::ChatStore
//! client ◀─ http::sse (frames) ◀─ chat::TurnStream ◀──┘ (chat::turn, a tracked producer task)
//! ```
//!
//! - [`cli`]: `mangoo serve | token | model`; [`startup`]: [`startup::Application`] wires
//!   everything; its `listener` is the accept loop (HTTP/1.1, h2c, HTTPS) with connection caps,
//!   idle and graceful close.
//! - [`config`]: the TOML file + `MANGOO_*` environment (figment), validated before start.
//! - [`http`]: routes, extractors, the SSE encoder, access log, CORS; `http::error` is the one
//!   place errors become responses. The OpenAI Chat Completions API and the Vercel AI SDK's UI
//!   message stream are two more framings of the same events, on the same chat service.
//! - [`auth`]: JWT verification (HS256, JWKS) and stream tickets, no HTTP in it.
//! - [`chat`]: turns, history, quotas, the producer of each answer.
//! - [`events`]: the events of an answer (start, message, done, error), shared by the chat
//!   service, the [`stream_log`] and the SSE encoder without those depending on one another.
//! - [`providers`]: one module per vendor behind a trait and a closed enum; `providers::local`
//!   is the embedded model with its own GGUF reader, Q8_0 kernel and BPE tokenizer.
//! - [`crypto`]: ring, the one crypto library (TLS, upstream clients, the AWS SDK, JWTs).
//! - [`store`]: chats and messages behind a trait, SQLite (writes through one writer thread that
//!   commits the writes arriving together in one transaction) or PostgreSQL (many instances).
//! - [`stream_log`]: the events of live answers and who owns each: in memory, or in Redis so that
//!   any instance can follow, stop or conclude an answer another one generates.
//! - [`shared`]: the Redis connections and the state every instance shares (limits, stream-cap
//!   leases, tickets).
//!
//! Dependency rules: `http` → `chat` → (`providers`, `store`) → `domain`. Providers and storage
//! know nothing of HTTP; handlers never call providers. `unsafe` is denied everywhere except
//! one call: the local model's matmul choosing its AVX2 build after detecting the CPU.

pub mod auth;
pub mod chat;
pub mod chat_client;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod events;
pub mod http;
pub mod metrics;
pub mod probe;
pub mod providers;
pub mod rate_limit;
pub mod shared;
pub mod sse_client;
pub mod startup;
pub mod store;
pub mod stream_log;
pub mod telemetry;
