//! The engine actor: one thread owns the model and runs every generation and adapter swap, so the
//! weights are never touched by two things at once. Handlers send it jobs over a channel and wait
//! on a oneshot reply.
//!
//! Dynamic batching: the actor takes as many queued rows (a request with `n` choices is `n` rows)
//! as fit in `max_batch` and decodes them together; requests that arrive while a batch decodes
//! join the next batch. A request larger than `max_batch` is decoded over consecutive batches.
//! Adapter swaps happen between batches and never in the middle of a request, so every choice of
//! a response comes from the same weights (the response names the adapter).
//!
//! Admission: at most `max_queue` requests are accepted and not yet answered; beyond that a
//! request is refused at once (the handler answers 503 with `Retry-After`). An accepted request
//! is always answered, unless its client went away: then its rows are skipped, or, once decoding,
//! leave the batch at the next token.
//!
//! Streaming: a request sent with [`Batcher::generate_streaming`] also gets each of its tokens
//! as it is decoded ([`Streamed`]), while its rows stay in the shared batch.
//!
//! Faults: an engine error answers every request of its batch with [`JobError::Failed`] (500).
//! A panic in the actor thread marks the server's [`Liveness`] failed before the thread lets go
//! of its queue, so every waiting request, and every later one, gets the fault (500), `/health`
//! answers 503 and the server exits to be restarted.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use model::{Engine, GenerateRequest, Generation, TokenEvent};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rl_http::metrics::{GaugeF64, PhaseTimes};
use rl_http::server::Liveness;
use tokio::sync::{mpsc, oneshot};

/// What the actor counts for `/metrics` (prometheus-client metrics: cheap atomic handles,
/// registered once by [`Stats::register`]).
#[derive(Debug, Clone)]
pub struct Stats {
    pub batches: Counter,
    pub batch_rows: Counter,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub rejected_full: Counter,
    /// Largest queue depth seen (a gauge only moved up).
    pub max_pending: Arc<AtomicUsize>,
    pub adapter_swaps: Counter,
    pub last_swap_seconds: GaugeF64,
    pub skipped_requests: Counter,
    /// Time per decoded batch and per adapter swap (the service's phase histogram).
    pub batch_seconds: Histogram,
    pub swap_seconds: Histogram,
}

impl Stats {
    /// New counters; the phase times go to the service's phase histograms.
    pub fn new(phases: &PhaseTimes) -> Self {
        Self {
            batches: Counter::default(),
            batch_rows: Counter::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            rejected_full: Counter::default(),
            max_pending: Arc::default(),
            adapter_swaps: Counter::default(),
            last_swap_seconds: GaugeF64::default(),
            skipped_requests: Counter::default(),
            batch_seconds: phases.histogram("batch"),
            swap_seconds: phases.histogram("adapter_swap"),
        }
    }

    /// Registers the counters (under the service's prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register("batches", "Batches decoded", self.batches.clone());
        r.register(
            "batch_rows",
            "Rows (choices) decoded, summed over batches",
            self.batch_rows.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens prefilled",
            self.prompt_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated",
            self.generated_tokens.clone(),
        );
        r.register(
            "rejected_full",
            "Requests answered 503 because the queue was full",
            self.rejected_full.clone(),
        );
        r.register(
            "abandoned_requests",
            "Requests dropped because their client left before they started",
            self.skipped_requests.clone(),
        );
        r.register(
            "adapter_swaps",
            "Adapter loads and unloads",
            self.adapter_swaps.clone(),
        );
        r.register(
            "adapter_last_swap_seconds",
            "Duration of the last adapter swap",
            self.last_swap_seconds.clone(),
        );
    }
}

/// The result of one request: its generations and the adapter they came from.
#[derive(Debug)]
pub struct Output {
    pub generations: Vec<Generation>,
    pub adapter: Option<String>,
}

/// A token of a streamed request, as soon as it is decoded: `choice` is the row's index in the
/// request.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub choice: usize,
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a job was not done.
#[derive(Debug)]
pub enum JobError {
    /// The queue is full: retry after this many seconds.
    Full { retry_after_s: u64 },
    /// The engine refused the job (an adapter it cannot load).
    Engine(model::Error),
    /// The engine failed (the server's fault, not the request's): the message says how.
    Failed(String),
    /// The actor is gone (the server is shutting down).
    Stopped,
}

/// An adapter to serve: the folder it loads from and the id the server answers with for it
/// (the loader's name, never the folder: a server's file layout stays its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub dir: PathBuf,
    pub id: String,
}

/// Where a swap's result goes: the swap time in ms, or why it failed.
type SwapReply = oneshot::Sender<Result<f64, model::Error>>;

/// Where a generation's result goes: the output, or how the engine failed.
type GenerateReply = oneshot::Sender<Result<Output, String>>;

enum Job {
    Generate {
        rows: Vec<GenerateRequest>,
        reply: GenerateReply,
        /// Where each token goes as it is decoded (streamed requests).
        stream: Option<mpsc::UnboundedSender<Streamed>>,
    },
    Adapter {
        /// `None`: back to the base model.
        adapter: Option<Named>,
        reply: SwapReply,
    },
}

/// The handlers' side of the actor. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
    pending: Arc<AtomicUsize>,
    max_queue: usize,
    max_batch: usize,
    pub stats: Arc<Stats>,
    adapter: Arc<Mutex<Option<String>>>,
    liveness: Liveness,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batcher(pending {}/{})", self.pending(), self.max_queue)
    }
}

impl Batcher {
    /// Starts the actor thread, which owns `engine` from now on; a panic in it fails `liveness`.
    pub fn start(
        engine: Engine,
        max_batch: usize,
        max_queue: usize,
        stats: Stats,
        liveness: Liveness,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(stats);
        let adapter = Arc::new(Mutex::new(None));
        let actor = Actor {
            _on_panic: PanicGuard(liveness.clone()),
            #[cfg(feature = "failpoints")]
            panic_at_batch: rl_http::server::failpoint(FAILPOINT_ENV, "engine-panic"),
            engine,
            rx,
            pending: pending.clone(),
            stats: stats.clone(),
            adapter: adapter.clone(),
            max_batch: max_batch.max(1),
            jobs: VecDeque::new(),
            swaps: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || actor.run())?;
        Ok(Self {
            tx,
            pending,
            max_queue: max_queue.max(1),
            max_batch: max_batch.max(1),
            stats,
            adapter,
            liveness,
        })
    }

    /// The outcome of a job whose reply never came: the engine's fault, or a shutdown.
    fn gone(&self) -> JobError {
        match self.liveness.fault() {
            Some(why) => JobError::Failed(why),
            None => JobError::Stopped,
        }
    }

    /// Requests accepted and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The id of the adapter being served, if any.
    pub fn adapter(&self) -> Option<String> {
        self.adapter.lock().map(|a| a.clone()).unwrap_or(None)
    }

    /// Queues the rows of one request and waits for all of them.
    pub async fn generate(&self, rows: Vec<GenerateRequest>) -> Result<Output, JobError> {
        let reply = self.submit(rows, None)?;
        self.answer(reply).await
    }

    /// Queues the rows of one request: its tokens arrive on the receiver as they are decoded,
    /// and the future gives the whole answer once every row is done (as [`Batcher::generate`]).
    /// Dropping the receiver makes the request's rows leave the batch at their next token.
    pub fn generate_streaming(
        &self,
        rows: Vec<GenerateRequest>,
    ) -> Result<
        (
            mpsc::UnboundedReceiver<Streamed>,
            impl std::future::Future<Output = Result<Output, JobError>> + Send + 'static,
        ),
        JobError,
    > {
        let (tx, rx) = mpsc::unbounded_channel();
        let reply = self.submit(rows, Some(tx))?;
        let this = self.clone();
        Ok((rx, async move { this.answer(reply).await }))
    }

    /// Admits a request (or refuses it: the queue is full, the engine failed) and hands it to
    /// the actor; the receiver of its answer.
    fn submit(
        &self,
        rows: Vec<GenerateRequest>,
        stream: Option<mpsc::UnboundedSender<Streamed>>,
    ) -> Result<oneshot::Receiver<Result<Output, String>>, JobError> {
        let before = self.pending.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_queue {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.stats.rejected_full.inc();
            // A rough wait: the batches ahead, at about a second each.
            let retry_after_s = 1 + (before / self.max_batch) as u64;
            return Err(JobError::Full { retry_after_s });
        }
        self.stats
            .max_pending
            .fetch_max(before + 1, Ordering::Relaxed);
        if let Some(why) = self.liveness.fault() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(JobError::Failed(why));
        }
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Job::Generate {
                rows,
                reply,
                stream,
            })
            .is_err()
        {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(self.gone());
        }
        Ok(rx)
    }

    /// Waits for a submitted request's answer.
    async fn answer(
        &self,
        rx: oneshot::Receiver<Result<Output, String>>,
    ) -> Result<Output, JobError> {
        match rx.await {
            Ok(Ok(out)) => {
                // JSON has no NaN or infinity: no such number may leave the server.
                if out.generations.iter().any(|g| !all_finite(g)) {
                    return Err(JobError::Failed(
                        "the engine produced a non-finite logprob; nothing was answered".into(),
                    ));
                }
                Ok(out)
            }
            Ok(Err(why)) => Err(JobError::Failed(why)),
            Err(_) => {
                // The actor died holding this request.
                self.pending.fetch_sub(1, Ordering::SeqCst);
                Err(self.gone())
            }
        }
    }

    /// Swaps the adapter (`None`: the base model) between batches; returns the swap time in ms.
    pub async fn set_adapter(&self, adapter: Option<Named>) -> Result<f64, JobError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Adapter { adapter, reply })
            .map_err(|_| self.gone())?;
        match rx.await {
            Ok(Ok(ms)) => Ok(ms),
            Ok(Err(e)) => Err(JobError::Engine(e)),
            Err(_) => Err(self.gone()),
        }
    }
}

/// Whether every logprob of a generation is finite.
fn all_finite(g: &model::Generation) -> bool {
    g.logprobs.iter().all(|lp| lp.is_finite())
        && g.top_logprobs
            .iter()
            .flatten()
            .all(|(_, lp)| lp.is_finite())
}

/// A request in the actor's backlog.
struct Pending {
    rows: Vec<GenerateRequest>,
    stream: Option<mpsc::UnboundedSender<Streamed>>,
    /// Rows handed to a batch so far.
    started: usize,
    done: Vec<Option<Generation>>,
    adapter: Option<String>,
    reply: GenerateReply,
}

/// Environment variable of the server's failpoint (fault tests, in builds with the `failpoints`
/// feature): `engine-panic[:N]` panics the actor at its N-th batch.
#[cfg(feature = "failpoints")]
pub const FAILPOINT_ENV: &str = "ROLLOUT_SERVER_FAILPOINT";

/// Fails the server's liveness when the actor thread unwinds from a panic. It is the actor's
/// first field, so it runs before the queue is dropped: no waiting request sees a bare shutdown.
struct PanicGuard(Liveness);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail("the engine thread panicked (its message is in the server's log)");
        }
    }
}

struct Actor {
    _on_panic: PanicGuard,
    /// The `engine-panic:N` failpoint: the batch at which to panic.
    #[cfg(feature = "failpoints")]
    panic_at_batch: Option<u64>,
    engine: Engine,
    rx: mpsc::UnboundedReceiver<Job>,
    pending: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    adapter: Arc<Mutex<Option<String>>>,
    max_batch: usize,
    jobs: VecDeque<Pending>,
    swaps: VecDeque<(Option<Named>, SwapReply)>,
}

impl Actor {
    fn run(mut self) {
        loop {
            if self.jobs.is_empty() && self.swaps.is_empty() {
                match self.rx.blocking_recv() {
                    Some(job) => self.accept(job),
                    None => return, // every handle dropped: the server stopped
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.accept(job);
            }
            // Swaps wait until no request is half done.
            if self.jobs.front().is_none_or(|j| j.started == 0) {
                while let Some((adapter, reply)) = self.swaps.pop_front() {
                    let result = self.swap(adapter);
                    let _ = reply.send(result);
                }
            }
            self.run_batch();
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Generate {
                rows,
                reply,
                stream,
            } => {
                let n = rows.len();
                self.jobs.push_back(Pending {
                    rows,
                    stream,
                    started: 0,
                    done: (0..n).map(|_| None).collect(),
                    adapter: None,
                    reply,
                });
            }
            Job::Adapter { adapter, reply } => self.swaps.push_back((adapter, reply)),
        }
    }

    fn swap(&mut self, adapter: Option<Named>) -> Result<f64, model::Error> {
        let t = Instant::now();
        match &adapter {
            Some(a) => self.engine.load_adapter(&a.dir)?,
            None => self.engine.set_adapter(None)?,
        }
        let seconds = t.elapsed().as_secs_f64();
        self.stats.adapter_swaps.inc();
        self.stats.last_swap_seconds.set(seconds);
        self.stats.swap_seconds.observe(seconds);
        if let Ok(mut a) = self.adapter.lock() {
            *a = adapter.map(|a| a.id);
        }
        Ok(seconds * 1000.0)
    }

    fn current_adapter(&self) -> Option<String> {
        self.adapter.lock().map(|a| a.clone()).unwrap_or(None)
    }

    /// Decodes up to `max_batch` rows from the front of the backlog and answers finished requests.
    fn run_batch(&mut self) {
        // Requests whose client went away before they started are dropped unanswered.
        let before = self.jobs.len();
        self.jobs.retain(|j| j.started > 0 || !j.reply.is_closed());
        let gone = before - self.jobs.len();
        if gone > 0 {
            self.pending.fetch_sub(gone, Ordering::SeqCst);
            self.stats.skipped_requests.inc_by(gone as u64);
        }
        let adapter = self.current_adapter();
        let mut batch: Vec<GenerateRequest> = Vec::new();
        let mut owners: Vec<(usize, usize)> = Vec::new(); // (job index, row index)
        for (j, job) in self.jobs.iter_mut().enumerate() {
            if batch.len() >= self.max_batch {
                break;
            }
            if job.started == 0 {
                job.adapter = adapter.clone();
            }
            let take = (job.rows.len() - job.started).min(self.max_batch - batch.len());
            for r in job.started..job.started + take {
                batch.push(job.rows[r].clone());
                owners.push((j, r));
            }
            job.started += take;
        }
        if batch.is_empty() {
            return;
        }
        self.stats.batches.inc();
        self.stats.batch_rows.inc_by(batch.len() as u64);
        let prompt_tokens: usize = batch.iter().map(|r| r.prompt().len()).sum();
        self.stats.prompt_tokens.inc_by(prompt_tokens as u64);
        #[cfg(feature = "failpoints")]
        if self.panic_at_batch == Some(self.stats.batches.get()) {
            panic!(
                "{FAILPOINT_ENV}: engine-panic at batch {}",
                self.stats.batches.get()
            );
        }
        let t = Instant::now();
        // Each token goes to its request's stream; a row whose reader went away (a dropped
        // stream, a closed reply) leaves the batch.
        let jobs = &self.jobs;
        let mut on_token = |ev: &TokenEvent<'_>| -> bool {
            let Some(job) = owners.get(ev.request).and_then(|&(j, _)| jobs.get(j)) else {
                return true;
            };
            match &job.stream {
                Some(tx) => tx
                    .send(Streamed {
                        choice: owners[ev.request].1,
                        token: ev.token,
                        logprob: ev.logprob,
                        top: ev.top.to_vec(),
                    })
                    .is_ok(),
                None => !job.reply.is_closed(),
            }
        };
        let generated = self.engine.generate_with(&batch, &mut on_token);
        self.stats.batch_seconds.observe(t.elapsed().as_secs_f64());
        match generated {
            Ok(generations) => {
                let tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();
                self.stats.generated_tokens.inc_by(tokens as u64);
                for ((j, r), g) in owners.into_iter().zip(generations) {
                    if let Some(job) = self.jobs.get_mut(j) {
                        job.done[r] = Some(g);
                    }
                }
            }
            Err(e) => {
                // Rows are validated by the handlers, so this is the engine failing: every
                // request in the batch gets the error.
                let message = e.to_string();
                let mut failed: Vec<usize> = owners.iter().map(|(j, _)| *j).collect();
                failed.dedup();
                for j in failed.into_iter().rev() {
                    if let Some(job) = self.jobs.remove(j) {
                        // Leave the queue before answering: a client that reads /metrics
                        // right after its answer must not still count itself.
                        self.pending.fetch_sub(1, Ordering::SeqCst);
                        let _ = job.reply.send(Err(format!("generation failed: {message}")));
                    }
                }
                return;
            }
        }
        // Answer the requests whose rows are all done (they are at the front).
        while self
            .jobs
            .front()
            .is_some_and(|j| j.done.iter().all(Option::is_some))
        {
            let Some(job) = self.jobs.pop_front() else {
                break;
            };
            let generations = job.done.into_iter().flatten().collect();
            // Out of the queue first, then answered (see above).
            self.pending.fetch_sub(1, Ordering::SeqCst);
            let _ = job.reply.send(Ok(Output {
                generations,
                adapter: job.adapter,
            }));
        }
    }
}
