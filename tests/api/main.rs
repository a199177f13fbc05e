//! Black-box tests: the real server on an ephemeral port, spoken to over HTTP, with a test
//! upstream that speaks Bedrock's event-stream protocol to the real AWS SDK and Anthropic's and
//! OpenAI's SSE formats, plus the real embedded model.

mod ai_sdk;
mod auth;
mod bench_smoke;
mod binary;
mod browser;
mod chats;
mod cluster;
mod connections;
mod cors;
mod dependency_faults;
mod diagnostics;
mod drain;
mod fake_sse_wires;
mod fake_upstream;
mod hardening;
mod helpers;
mod idle_proxy;
mod input_errors;
mod jwks;
mod local_model;
mod nginx;
mod openai_api;
mod openai_sdk;
mod openapi;
mod operations;
mod probe;
mod providers;
mod redis_cluster;
mod resilience;
mod resume;
mod services;
mod shared_bounds;
mod shared_state;
mod stalled;
mod store;
mod streaming;
mod terminal_chat;
mod upstream_failures;
mod usage;
