//! The OpenAPI description of the whole HTTP API, generated from the handlers' own annotations and
//! types (utoipa), so it cannot drift from the code. Served at `/api/v1/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{ai_sdk, chat_stream, chats, diagnostics, openai, sse, usage};
use crate::http::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mangoo",
        description = "Real-time LLM chat streaming over Server-Sent Events."
    ),
    paths(
        chat_stream::post_stream,
        chat_stream::get_stream,
        chat_stream::resume_stream,
        chat_stream::stop,
        chat_stream::issue_ticket,
        chats::list_chats,
        chats::search_chats,
        chats::list_messages,
        chats::delete_chat,
        chats::update_chat,
        chats::rewind_chat,
        chats::list_bots,
        chats::limits,
        usage::my_usage,
        usage::all_usage,
        diagnostics::diagnostics_stream,
        ai_sdk::post_chat,
        ai_sdk::resume_chat,
        openai::chat_completions,
        openai::resume_completion,
        openai::list_models,
        openai::get_model,
        super::healthz,
        super::readyz,
    ),
    components(schemas(
        ErrorBody,
        sse::StartData,
        sse::ContentData,
        sse::DoneData,
        sse::ErrorData,
        sse::UsageData,
    )),
    modifiers(&Security),
    tags(
        (name = "chat", description = "Asking, streaming, resuming and stopping answers"),
        (name = "chats", description = "The caller's chats and bots"),
        (name = "health", description = "Load-balancer checks"),
        (name = "usage", description = "Tokens spent, from the usage ledger"),
        (name = "ai-sdk", description = "The Vercel AI SDK's UI message stream (`useChat` with `DefaultChatTransport`)"),
        (name = "openai", description = "The OpenAI-compatible Chat Completions API (`base_url` = …/v1)"),
        (name = "diagnostics", description = "What `mangoo probe` measures the path with"),
    )
)]
pub struct ApiDoc;

/// `Authorization: Bearer <JWT>`, or — on the stream routes only — the JWT as `?token=` (for
/// EventSource).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("token"))),
        );
    }
}

pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
