//! Amazon Bedrock through the official SDK's ConverseStream: one client per process, reused by
//! every request; credentials and region from the standard AWS chains.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::{Credentials, Region};
use aws_sdk_bedrockruntime::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::operation::converse_stream::ConverseStreamError;
use aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver;
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseStreamOutput,
    InferenceConfiguration, Message, SystemContentBlock,
};

use super::{
    Admission, ChatProvider, ModelRequest, ProviderError, ProviderErrorKind, ProviderEvent,
    ProviderStream,
};
use crate::config::BedrockConfig;
use crate::domain::{Role, TokenUsage};

pub const PROVIDER_NAME: &str = "bedrock";

type Events = EventReceiver<ConverseStreamOutput, ConverseStreamOutputError>;

pub struct BedrockProvider {
    client: Client,
}

impl BedrockProvider {
    pub async fn new(settings: &BedrockConfig) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https_client())
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
                    .build(),
            )
            // Models can think for a long time before the first token; the stream pipeline owns
            // those timeouts, so the SDK's byte-rate watchdog must not cut a healthy stream.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
            if is_loopback_url(url) {
                loader = local_endpoint_identity(loader, settings);
            }
        }
        let sdk_config = loader.load().await;
        Self {
            client: Client::new(&sdk_config),
        }
    }
}

/// The SDK's own hyper + rustls client, on ring instead of its default aws-lc (see
/// `crate::crypto`). Credential providers (STS, SSO, IMDS) get it through the same config.
fn https_client() -> aws_sdk_bedrockruntime::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// A Bedrock-compatible server on this machine (a test endpoint, a local emulator) needs neither
/// a real region nor real credentials. Taking them from the environment or profile when present,
/// and otherwise using fixed local ones, keeps the SDK from probing the EC2 metadata service.
fn local_endpoint_identity(
    loader: aws_config::ConfigLoader,
    settings: &BedrockConfig,
) -> aws_config::ConfigLoader {
    let credentials = CredentialsProviderChain::first_try(
        "Environment",
        aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else(
        "Profile",
        aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
    )
    .or_else(
        "LocalEndpoint",
        Credentials::new("mangoo-local", "mangoo-local", None, None, "mangoo-local"),
    );
    let loader = loader.credentials_provider(credentials);
    if settings.region.is_none() && std::env::var_os("AWS_REGION").is_none() {
        loader.region(Region::new("us-east-1"))
    } else {
        loader
    }
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[async_trait::async_trait]
impl ChatProvider for BedrockProvider {
    async fn stream(
        &self,
        request: ModelRequest,
        _admission: Admission,
    ) -> Result<ProviderStream, ProviderError> {
        let messages = request
            .messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::User => ConversationRole::User,
                    Role::Assistant => ConversationRole::Assistant,
                };
                Message::builder()
                    .role(role)
                    .content(ContentBlock::Text(m.content.clone()))
                    .build()
                    .map_err(|e| {
                        ProviderError::new(ProviderErrorKind::InvalidRequest, e.to_string())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let inference = InferenceConfiguration::builder()
            .max_tokens(i32::try_from(request.max_tokens).unwrap_or(i32::MAX))
            .set_temperature(request.temperature)
            .set_top_p(request.top_p)
            .build();
        let output = self
            .client
            .converse_stream()
            .model_id(&request.model)
            .set_system(
                request
                    .system_prompt
                    .map(|p| vec![SystemContentBlock::Text(p)]),
            )
            .set_messages(Some(messages))
            .inference_config(inference)
            .send()
            .await
            .map_err(|e| request_error(&e))?;
        Ok(event_stream(output.stream))
    }
}

/// Turns the SDK's receiver into our events. Ends after the first error, since Bedrock sends
/// nothing useful after an exception frame, and reports a stream that ends without Bedrock's
/// `messageStop` as a lost connection rather than a finished answer.
fn event_stream(mut events: Events) -> ProviderStream {
    Box::pin(async_stream::stream! {
        let mut stopped = false;
        loop {
            match events.recv().await {
                Ok(Some(ConverseStreamOutput::ContentBlockDelta(delta))) => {
                    if let Some(ContentBlockDelta::Text(text)) = delta.delta
                        && !text.is_empty()
                    {
                        yield Ok(ProviderEvent::TextDelta(text));
                    }
                }
                Ok(Some(ConverseStreamOutput::Metadata(meta))) => {
                    if let Some(usage) = meta.usage {
                        yield Ok(ProviderEvent::Usage(TokenUsage {
                            input_tokens: usage.input_tokens.max(0) as u64,
                            output_tokens: usage.output_tokens.max(0) as u64,
                        }));
                    }
                }
                Ok(Some(ConverseStreamOutput::MessageStop(_))) => stopped = true,
                // Message and block starts carry nothing we stream.
                Ok(Some(_)) => {}
                Ok(None) => {
                    if !stopped {
                        yield Err(ProviderError::new(
                            ProviderErrorKind::Connection,
                            "Bedrock closed the stream before the answer was finished",
                        ));
                    }
                    return;
                }
                Err(e) => {
                    yield Err(stream_error(&e));
                    return;
                }
            }
        }
    })
}

/// Maps a failure of the initial ConverseStream request.
fn request_error<R: std::fmt::Debug>(err: &SdkError<ConverseStreamError, R>) -> ProviderError {
    use ConverseStreamError as E;
    use ProviderErrorKind as K;
    let kind = match err {
        SdkError::ServiceError(service) => match service.err() {
            E::ThrottlingException(_) => K::Throttled,
            E::ValidationException(_) | E::ResourceNotFoundException(_) => K::InvalidRequest,
            E::AccessDeniedException(_) => K::AccessDenied,
            E::ModelTimeoutException(_) => K::Timeout,
            E::ServiceUnavailableException(_) | E::ModelNotReadyException(_) => K::Unavailable,
            _ => K::Upstream,
        },
        SdkError::TimeoutError(_) => K::Timeout,
        // Dispatch covers connecting; a timeout there is the connect timeout.
        SdkError::DispatchFailure(failure) if failure.is_timeout() => K::ConnectTimeout,
        SdkError::DispatchFailure(_) => K::Connection,
        _ => K::Upstream,
    };
    describe(err, kind)
}

/// Maps an exception frame or a broken connection once the stream has started.
fn stream_error<R: std::fmt::Debug>(err: &SdkError<ConverseStreamOutputError, R>) -> ProviderError {
    use ConverseStreamOutputError as E;
    use ProviderErrorKind as K;
    let kind = match err {
        SdkError::ServiceError(service) => match service.err() {
            E::ThrottlingException(_) => K::Throttled,
            E::ValidationException(_) => K::InvalidRequest,
            E::ServiceUnavailableException(_) => K::Unavailable,
            _ => K::Upstream,
        },
        SdkError::TimeoutError(_) => K::Timeout,
        // A reset or truncated connection surfaces as a dispatch failure.
        SdkError::DispatchFailure(_) => K::Connection,
        _ => K::Upstream,
    };
    describe(err, kind)
}

/// The client hears the kind of failure; Bedrock's own message (an AccessDenied names the
/// account and the role's ARN) and the SDK's error chain go to the log.
fn describe<E, R>(err: &SdkError<E, R>, kind: ProviderErrorKind) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = DisplayErrorContext(err).to_string();
    tracing::warn!(provider = PROVIDER_NAME, "Bedrock call failed: {detail}");
    let mut error = ProviderError::from_upstream(kind, "Bedrock", detail);
    if !matches!(err, SdkError::ServiceError(_))
        && !matches!(
            kind,
            ProviderErrorKind::Connection
                | ProviderErrorKind::Timeout
                | ProviderErrorKind::ConnectTimeout
        )
    {
        error.message = "Bedrock sent a response that could not be read".into();
    }
    error
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn loopback_endpoints_are_recognised() {
        assert!(is_loopback_url("http://127.0.0.1:9100"));
        assert!(is_loopback_url("http://localhost:9100/"));
        assert!(is_loopback_url("http://[::1]:9100"));
        assert!(!is_loopback_url(
            "https://bedrock-runtime.us-east-1.amazonaws.com"
        ));
        assert!(!is_loopback_url("http://10.0.0.1:80"));
    }
}
