//! The embedded local model (provider = "local"): SmolLM2-135M-Instruct decoded on the CPU inside
//! the process, so a fresh machine with no cloud account still gets a real answer.
//!
//! Decoding never runs on the async runtime. A loader thread reads the weights once; then
//! `concurrency` worker threads, each with its own KV cache over the shared weights, take jobs
//! from a queue. Admission is a semaphore of `concurrency + queue_size` places taken before the
//! HTTP response starts, so a full queue is a plain `503` rather than a stream that never moves.

pub mod error;
pub mod fetch;
pub mod gguf;
pub mod llama;
pub mod matmul;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod tokenizer;

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
use crate::rate_limit::StreamSlots;
use llama::Session;
use model::{LocalModel, SamplingParams, generate};
use prometheus_client::metrics::counter::Counter;

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
    /// Each user's share of the places: one user's burst cannot fill the whole queue.
    shares: StreamSlots,
    state: Arc<Mutex<EngineState>>,
    /// Prompt tokens computed (a metric: what long prompts cost).
    prompt_tokens: Counter,
}

impl LocalProvider {
    pub fn new(settings: &LocalConfig, prompt_tokens: Counter) -> Self {
        let path = settings
            .model_path
            .clone()
            .unwrap_or_else(default_model_path);
        let provider = Self {
            places: Arc::new(Semaphore::new(settings.concurrency + settings.queue_size)),
            shares: StreamSlots::new(settings.max_queued_per_user),
            path,
            settings: settings.clone(),
            state: Arc::new(Mutex::new(EngineState::Missing)),
            prompt_tokens,
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
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*state, EngineState::Missing) && self.path.is_file() {
            let limits = WorkerLimits {
                max_prompt_tokens: self.settings.max_prompt_tokens,
                prompt_tokens: self.prompt_tokens.clone(),
            };
            *state = match start_engine(&self.path, &self.settings, limits, self.state.clone()) {
                Ok(jobs) => EngineState::Running(jobs),
                Err(e) => EngineState::Failed(format!("cannot start the model threads: {e}")),
            };
        }
        match &*state {
            EngineState::Running(jobs) => Ok(jobs.clone()),
            EngineState::Missing => Err(ProviderError::new(
                ProviderErrorKind::ModelUnavailable,
                "the local model is not downloaded yet",
            )
            .with_detail(format!(
                "run `mangoo model fetch` (expected at {})",
                self.path.display()
            ))),
            EngineState::Failed(reason) => Err(ProviderError::new(
                ProviderErrorKind::ModelUnavailable,
                "the local model could not be started",
            )
            .with_detail(reason.clone())),
        }
    }
}

#[async_trait::async_trait]
impl ChatProvider for LocalProvider {
    fn admit(&self, user: &str) -> Result<Admission, ProviderError> {
        self.engine()?;
        let busy = || {
            ProviderError::new(
                ProviderErrorKind::Overloaded,
                "the local model is busy with other answers; retry shortly",
            )
        };
        let share = self.shares.take(user).ok_or_else(busy)?;
        let permit = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy())?;
        Ok(Admission::with_permit(permit, share))
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

/// What every worker enforces and counts.
#[derive(Clone)]
struct WorkerLimits {
    max_prompt_tokens: usize,
    prompt_tokens: Counter,
}

/// Spawns the loader, which becomes the first worker once the weights are in memory.
fn start_engine(
    path: &Path,
    settings: &LocalConfig,
    limits: WorkerLimits,
    state: Arc<Mutex<EngineState>>,
) -> std::io::Result<std_mpsc::SyncSender<Job>> {
    let (jobs, queue) = std_mpsc::sync_channel(settings.concurrency + settings.queue_size);
    let queue = Arc::new(Mutex::new(queue));
    let path = path.to_owned();
    let workers = settings.concurrency;
    let pool = Arc::new(matmul_pool(settings.threads)?);
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
                let (queue, model, limits) = (queue.clone(), model.clone(), limits.clone());
                let pool = pool.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("mangoo-model-{n}"))
                    .spawn(move || work(&queue, &model, &limits, &pool));
                if let Err(e) = spawned {
                    tracing::error!("could not start local model worker {n}: {e}");
                }
            }
            work(&queue, &model, &limits, &pool);
        })?;
    Ok(jobs)
}

/// The threads every answer's matrix products are split across (shared by the workers, so
/// `concurrency` answers at once never run more threads than cores). They end with the engine.
fn matmul_pool(threads: usize) -> std::io::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|n| format!("mangoo-matmul-{n}"))
        .build()
        .map_err(std::io::Error::other)
}

fn work(
    queue: &Mutex<std_mpsc::Receiver<Job>>,
    model: &LocalModel,
    limits: &WorkerLimits,
    pool: &rayon::ThreadPool,
) {
    let mut session = Session::new(&model.weights);
    // Compute the default system prompt once now, so even the first answer only pays for the
    // user's own words (the session reuses any shared prefix).
    if let Ok(prefix) = model.tokenizer.system_prefix(None)
        && let Err(e) = pool.install(|| session.prefill(&model.weights, &prefix))
    {
        tracing::warn!("could not warm the local model: {e}");
    }
    loop {
        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(job) = job else {
            return; // the provider is gone
        };
        if job.events.is_closed() {
            continue; // the client left while the job waited
        }
        // Inside the pool, the products of this answer are split across its threads.
        if let Err(err) = pool.install(|| answer(model, &mut session, &job, limits)) {
            let _ = job.events.blocking_send(Err(err));
        }
    }
}

fn refuse_jobs(queue: &Mutex<std_mpsc::Receiver<Job>>, reason: &str) {
    while let Ok(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
        let err = ProviderError::new(
            ProviderErrorKind::ModelUnavailable,
            "the local model could not be started",
        )
        .with_detail(reason);
        let _ = job.events.blocking_send(Err(err));
    }
}

fn answer(
    model: &LocalModel,
    session: &mut Session,
    job: &Job,
    limits: &WorkerLimits,
) -> Result<(), ProviderError> {
    let prompt = fitted_prompt(model, &job.request, limits.max_prompt_tokens)?;
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
    .map_err(model_failure)?;
    limits
        .prompt_tokens
        .inc_by(generated.prompt_computed as u64);
    let usage = TokenUsage {
        input_tokens: generated.prompt_tokens as u64,
        output_tokens: generated.output_tokens as u64,
    };
    let _ = events.blocking_send(Ok(ProviderEvent::Usage(usage)));
    Ok(())
}

/// The ChatML prompt within the local bot's budget — `max_prompt_tokens`, and the context less
/// room for an answer — dropping the oldest turns (a question with its answer) until it fits.
/// Each message is tokenized once.
fn fitted_prompt(
    model: &LocalModel,
    request: &ModelRequest,
    max_prompt_tokens: usize,
) -> Result<Vec<u32>, ProviderError> {
    let context = model.weights.context;
    let budget = context
        .saturating_sub((request.max_tokens as usize).clamp(16, 512))
        .min(max_prompt_tokens);
    let tokenizer = &model.tokenizer;
    let system = tokenizer.system_prefix(request.system_prompt.as_deref());
    let opening = tokenizer.answer_opening();
    let turns: Result<Vec<Vec<u32>>, _> = request
        .messages
        .iter()
        .map(|m| tokenizer.turn(m.role, &m.content))
        .collect();
    let (system, opening, turns) = match (system, opening, turns) {
        (Ok(system), Ok(opening), Ok(turns)) => (system, opening, turns),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Err(model_failure(e)),
    };
    let fixed = system.len() + opening.len();
    let mut total = fixed + turns.iter().map(Vec::len).sum::<usize>();
    let mut first = 0;
    while total > budget {
        if turns.len() - first <= 1 {
            return Err(ProviderError::new(
                ProviderErrorKind::InvalidRequest,
                format!("the message is too long for the local model ({budget} tokens at most)"),
            ));
        }
        total -= turns[first].len() + turns[first + 1].len();
        first += 2;
    }
    let mut prompt = Vec::with_capacity(total);
    prompt.extend(system);
    for turn in &turns[first..] {
        prompt.extend_from_slice(turn);
    }
    prompt.extend(opening);
    Ok(prompt)
}

fn model_failure(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(ProviderErrorKind::Upstream, "the local model failed")
        .with_detail(e.to_string())
}
