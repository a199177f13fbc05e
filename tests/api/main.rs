//! Black-box tests: the real server on an ephemeral port, spoken to over HTTP, with a test
//! Bedrock endpoint that speaks the real event-stream protocol to the real AWS SDK.

mod auth;
mod binary;
mod chats;
mod cors;
mod fake_bedrock;
mod helpers;
mod input_errors;
mod streaming;
mod upstream_failures;
