//! The embedded local model (provider = "local"): SmolLM2-135M-Instruct decoded on the CPU inside
//! the process, so a fresh machine with no cloud account still gets a real answer.
//!
//! Decoding never runs on the async runtime. A loader thread reads the weights once; then
//! `concurrency` worker threads, each with its own KV cache over the shared weights, take jobs
//! from a queue. Admission is a semaphore of `concurrency + queue_size` places taken before the
//! HTTP response starts, so a full queue is a plain `503` rather than a stream that never moves.

pub mod fetch;
pub mod llama;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    Admission, ChatProvider, ModelRequest, ProviderError, ProviderErrorKind, ProviderEvent,
    ProviderStream,
};
use crate::config::LocalConfig;
use crate::domain::TokenUsage;
use llama::Session;
use model::{LocalModel, SamplingParams, generate};

pub const PROVIDER_NAME: &str = "local";
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// Events a decoding thread may run ahead of its client.
const EVENT_BUFFER: usize = 64;

/// Where `mangoo model fetch` puts the model unless told otherwise:
/// `$XDG_CACHE_HOME/mangoo/models/` or `~/.cache/mangoo/models/`.
pub fn default_model_path() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("mangoo/models").join(MODEL_FILE)
}

type Events = mpsc::Sender<Result<ProviderEvent, ProviderError>>;

struct Job {
    request: ModelRequest,
    events: Events,
    /// Held until decoding ends, so the place stays taken while the job runs.
    _admission: Admission,
}

enum EngineState {
    /// No model file yet; admission checks again each time.
    Missing,
    Running(std_mpsc::SyncSender<Job>),
    Failed(String),
}

pub struct LocalProvider {
    path: PathBuf,
    settings: LocalConfig,
    places: Arc<Semaphore>,
    state: Arc<Mutex<EngineState>>,
}

impl LocalProvider {
    pub fn new(settings: &LocalConfig) -> Self {
        let path = settings
            .model_path
            .clone()
            .unwrap_or_else(default_model_path);
        let provider = Self {
            places: Arc::new(Semaphore::new(settings.concurrency + settings.queue_size)),
            path,
            settings: settings.clone(),
            state: Arc::new(Mutex::new(EngineState::Missing)),
        };
        // Start loading right away when the file is there, so the first request does not pay
        // for it; a missing file is only an error for requests that need it.
        let _ = provider.engine();
        provider
    }

    pub fn model_path(&self) -> &Path {
        &self.path
    }

    /// The job queue of a running engine, starting it if the model file has appeared.
    fn engine(&self) -> Result<std_mpsc::SyncSender<Job>, ProviderError> {
        let mut state = self.state.lock().expect("local engine lock");
        if matches!(*state, EngineState::Missing) && self.path.is_file() {
            *state = match start_engine(&self.path, &self.settings, self.state.clone()) {
                Ok(jobs) => EngineState::Running(jobs),
                Err(e) => EngineState::Failed(format!("cannot start the model threads: {e}")),
            };
        }
        match &*state {
            EngineState::Running(jobs) => Ok(jobs.clone()),
            EngineState::Missing => Err(ProviderError::new(
                ProviderErrorKind::ModelUnavailable,
                format!(
                    "the local model is not downloaded: run `mangoo model fetch` (expected at {})",
                    self.path.display()
                ),
            )),
            EngineState::Failed(reason) => Err(ProviderError::new(
                ProviderErrorKind::ModelUnavailable,
                reason.clone(),
            )),
        }
    }
}

#[async_trait::async_trait]
impl ChatProvider for LocalProvider {
    fn admit(&self) -> Result<Admission, ProviderError> {
        self.engine()?;
        let permit = self.places.clone().try_acquire_owned().map_err(|_| {
            ProviderError::new(
                ProviderErrorKind::Overloaded,
                "the local model is busy with other answers; retry shortly",
            )
        })?;
        Ok(Admission::with_permit(permit))
    }

    async fn stream(
        &self,
        request: ModelRequest,
        admission: Admission,
    ) -> Result<ProviderStream, ProviderError> {
        let jobs = self.engine()?;
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        let job = Job {
            request,
            events,
            _admission: admission,
        };
        // The queue holds as many jobs as there are admission places, so it is never full.
        jobs.try_send(job).map_err(|_| {
            ProviderError::new(
                ProviderErrorKind::Unavailable,
                "the local model threads stopped",
            )
        })?;
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Spawns the loader, which becomes the first worker once the weights are in memory.
fn start_engine(
    path: &Path,
    settings: &LocalConfig,
    state: Arc<Mutex<EngineState>>,
) -> std::io::Result<std_mpsc::SyncSender<Job>> {
    let (jobs, queue) = std_mpsc::sync_channel(settings.concurrency + settings.queue_size);
    let queue = Arc::new(Mutex::new(queue));
    let path = path.to_owned();
    let workers = settings.concurrency;
    std::thread::Builder::new()
        .name("mangoo-model-0".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let model = match LocalModel::load(&path) {
                Ok(model) => model,
                Err(e) => {
                    tracing::error!(path = %path.display(), "local model failed to load: {e}");
                    let reason = format!("the local model could not be loaded: {e}");
                    *state.lock().expect("local engine lock") = EngineState::Failed(reason.clone());
                    return refuse_jobs(&queue, &reason);
                }
            };
            tracing::info!(
                path = %path.display(),
                load_ms = started.elapsed().as_millis() as u64,
                "local model loaded"
            );
            let model = Arc::new(model);
            for n in 1..workers {
                let (queue, model) = (queue.clone(), model.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("mangoo-model-{n}"))
                    .spawn(move || work(&queue, &model));
                if let Err(e) = spawned {
                    tracing::error!("could not start local model worker {n}: {e}");
                }
            }
            work(&queue, &model);
        })?;
    Ok(jobs)
}

fn work(queue: &Mutex<std_mpsc::Receiver<Job>>, model: &LocalModel) {
    let mut session = Session::new(&model.weights);
    // Compute the default system prompt once now, so even the first answer only pays for the
    // user's own words (the session reuses any shared prefix).
    if let Ok(prefix) = model.tokenizer.system_prefix(None)
        && let Err(e) = session.prefill(&model.weights, &prefix)
    {
        tracing::warn!("could not warm the local model: {e}");
    }
    loop {
        let job = queue.lock().expect("job queue lock").recv();
        let Ok(job) = job else {
            return; // the provider is gone
        };
        if job.events.is_closed() {
            continue; // the client left while the job waited
        }
        if let Err(err) = answer(model, &mut session, &job) {
            let _ = job.events.blocking_send(Err(err));
        }
    }
}

fn refuse_jobs(queue: &Mutex<std_mpsc::Receiver<Job>>, reason: &str) {
    while let Ok(job) = queue.lock().expect("job queue lock").recv() {
        let err = ProviderError::new(ProviderErrorKind::ModelUnavailable, reason);
        let _ = job.events.blocking_send(Err(err));
    }
}

fn answer(model: &LocalModel, session: &mut Session, job: &Job) -> Result<(), ProviderError> {
    let prompt = fitted_prompt(model, &job.request)?;
    let sampling = SamplingParams {
        max_tokens: job.request.max_tokens,
        temperature: job.request.temperature.map(f64::from),
        top_p: job.request.top_p.map(f64::from),
        seed: rand::random(),
    };
    let events = &job.events;
    let generated = generate(
        &model.weights,
        session,
        &model.tokenizer,
        &prompt,
        sampling,
        || events.is_closed(),
        |text| {
            events
                .blocking_send(Ok(ProviderEvent::TextDelta(text)))
                .is_ok()
        },
    )
    .map_err(|e| ProviderError::new(ProviderErrorKind::Upstream, e.to_string()))?;
    let usage = TokenUsage {
        input_tokens: generated.prompt_tokens as u64,
        output_tokens: generated.output_tokens as u64,
    };
    let _ = events.blocking_send(Ok(ProviderEvent::Usage(usage)));
    Ok(())
}

/// The ChatML prompt, dropping the oldest turns when the conversation outgrows the context.
fn fitted_prompt(model: &LocalModel, request: &ModelRequest) -> Result<Vec<u32>, ProviderError> {
    let context = model.weights.context;
    // Leave room for at least a short answer.
    let budget = context.saturating_sub((request.max_tokens as usize).clamp(16, 512));
    let messages: Vec<_> = request
        .messages
        .iter()
        .map(|m| (m.role, m.content.as_str()))
        .collect();
    let mut first = 0;
    loop {
        let prompt = model
            .tokenizer
            .chat_prompt(request.system_prompt.as_deref(), &messages[first..])
            .map_err(|e| ProviderError::new(ProviderErrorKind::Upstream, e.to_string()))?;
        if prompt.len() <= budget {
            return Ok(prompt);
        }
        if messages.len() - first <= 1 {
            return Err(ProviderError::new(
                ProviderErrorKind::InvalidRequest,
                format!("the message is too long for the local model's {context}-token context"),
            ));
        }
        first += 2;
    }
}
