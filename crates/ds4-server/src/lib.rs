//! ds4-server: the OpenAI / Anthropic compatible HTTP server of ds4-rs (`ds4 serve`), following
//! antirez/ds4's `ds4-server` (ds4-features.md §2) and fixing what its users ask for.
//!
//! * Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
//!   `POST /v1/completions`, `POST /v1/responses`, `POST /v1/messages`,
//!   `POST /v1/messages/count_tokens`, `GET /health`, `GET /metrics` (Prometheus text).
//!   Streaming and non-streaming, with each protocol's event sequence ([`format`]).
//! * One engine worker thread owns the live [`ds4_model::Session`] ([`worker`]); handlers parse,
//!   render and tokenize ([`request`], [`http::prepare`]), then queue a job on a bounded queue
//!   (`--queue-max`; 503 + `Retry-After` when full). A client that disconnects cancels its job
//!   (checked between prefill chunks and decode steps).
//! * Live prefix reuse (token prefix, remembered visible transcript of thinking turns, rendered
//!   text prefix with suffix-only tokenization) and the disk KV cache (`--kv-disk-dir`, cold /
//!   continued / evict / shutdown checkpoints through [`ds4_kvstore`]).
//! * Tool calls both ways with the exact-DSML replay map ([`toolmem`]) keyed by unguessable ids.
//! * Operations: `--api-key` (or `DS4_API_KEY`) on every route, body limit (413), stalled
//!   bodies refused with 408 (`--body-timeout-secs`) and stalled request heads or idle
//!   keep-alive connections closed (`--header-timeout-secs`; both ds4's 10 s socket timeout),
//!   protocol-shaped errors, SSE keep-alive comments while a streamed request waits or
//!   prefills, errors after the headers as SSE error events, `--trace FILE`, and a bounded
//!   drain on SIGINT/SIGTERM that writes the shutdown checkpoint.
//!
//! Entry points: [`serve`] (blocking, owns a tokio runtime), [`Server::start`] +
//! [`Server::router`] (tests without a socket: `router.oneshot(request)`), [`serve_on`] (a bound
//! listener and a shutdown future).
//!
//! **Test-only scripted generation**: the hidden `--test-script FILE` flag (env
//! `DS4_SERVER_TEST_SCRIPT`) makes the worker emit scripted text instead of sampling, through
//! the real session, parser and streaming path; see [`script`].

pub mod args;
pub mod error;
pub mod format;
pub mod http;
pub mod ids;
pub mod metrics;
pub mod request;
pub mod script;
pub mod toolmem;
pub mod trace;
pub mod worker;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ds4_kvstore::{KvOptions, KvStore};
use ds4_model::{Backend, Session, SessionOptions, Shape};
use ds4_tokenizer::Tokenizer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use args::ServeArgs;
pub use error::{Api, ApiError, ServerError};
pub use http::{AppState, router};
pub use metrics::Metrics;

/// Creates the live session's backend for a context size.
pub type BackendFactory = Box<dyn FnMut(usize) -> ds4_model::Result<Box<dyn Backend>> + Send>;

/// What the `ds4` binary hands the server: the loaded model's tokenizer and identity, and a
/// factory for the backend of the live session.
pub struct EngineBundle {
    pub tokenizer: Arc<Tokenizer>,
    pub shape: Shape,
    /// Model id advertised by `/v1/models` unless `--model-name` overrides it (ds4:
    /// `deepseek-v4-flash`).
    pub model_name: String,
    /// Routed-expert quant bits (2 or 4), stored in disk checkpoints.
    pub quant_bits: u8,
    /// Model fingerprint; disk checkpoints of another fingerprint are ignored. Whatever else
    /// changes the KV state belongs in it too (`ds4 serve` folds in the directional steering).
    pub fingerprint: [u8; 32],
    pub backend_factory: BackendFactory,
}

impl std::fmt::Debug for EngineBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBundle")
            .field("model_name", &self.model_name)
            .field("quant_bits", &self.quant_bits)
            .finish_non_exhaustive()
    }
}

/// A started server: shared state plus the engine worker thread.
pub struct Server {
    state: AppState,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Validate the flags, create the live session, open the disk cache and the trace, and
    /// start the engine worker. Must be called inside a tokio runtime.
    pub fn start(args: ServeArgs, mut engine: EngineBundle) -> Result<Server, ServerError> {
        args.validate().map_err(ServerError::BadOption)?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            ServerError::BadOption("Server::start must run inside a tokio runtime".into())
        })?;
        let backend = (engine.backend_factory)(args.ctx)?;
        let session = Session::with_backend(
            backend,
            SessionOptions {
                ctx: args.ctx,
                prefill_chunk: args.chunk(),
            },
        )?;
        let store = match &args.kv_disk_dir {
            Some(dir) => {
                let opts = KvOptions {
                    budget_bytes: args.kv_disk_space_mb.saturating_mul(1 << 20),
                    min_tokens: args.kv_cache_min_tokens.min(u32::MAX as usize) as u32,
                    reject_different_quant: args.kv_cache_reject_different_quant,
                    quant_bits: engine.quant_bits,
                    fingerprint: engine.fingerprint,
                };
                let s = KvStore::open(dir, opts)?;
                tracing::info!(target: "kvcache",
                    "KV disk cache {} (budget={} MiB, cross-quant={}, min={}, cold_max={}, continued={}, trim={}, align={})",
                    dir.display(), args.kv_disk_space_mb,
                    if args.kv_cache_reject_different_quant { "reject" } else { "accept" },
                    args.kv_cache_min_tokens, args.kv_cache_cold_max_tokens,
                    args.continued_frontier(), args.kv_cache_boundary_trim_tokens,
                    args.kv_cache_boundary_align_tokens);
                Some(Arc::new(s))
            }
            None => None,
        };
        let tracer = match &args.trace {
            Some(p) => Some(Arc::new(trace::Tracer::create(p)?)),
            None => None,
        };
        let script = match &args.test_script {
            Some(p) => {
                let s = script::Script::load(p).map_err(|reason| ServerError::Script {
                    path: p.display().to_string(),
                    reason,
                })?;
                tracing::warn!(target: "ds4_server", "TEST SCRIPT LOADED ({}): scripted text replaces sampling for matching prompts", p.display());
                Some(s)
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        if let Ok(mut t) = metrics.started.lock() {
            *t = Some(std::time::Instant::now());
        }
        let toolmem = Arc::new(Mutex::new(toolmem::ToolMemory::new(
            args.tool_memory_max_ids,
            toolmem::MAX_BYTES,
        )));
        let (tx, rx) = mpsc::channel(args.queue_max);
        let draining = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let cfg = worker::WorkerConfig {
            ctx: args.ctx,
            prefill_chunk: args.chunk(),
            min_tokens: args.kv_cache_min_tokens,
            cold_max: args.kv_cache_cold_max_tokens,
            frontier: args.continued_frontier(),
            trim: args.kv_cache_boundary_trim_tokens,
            align: args.kv_cache_boundary_align_tokens,
            quant_bits: engine.quant_bits,
        };
        let w = worker::Worker::new(
            session,
            engine.tokenizer.clone(),
            cfg,
            store.clone(),
            toolmem.clone(),
            metrics.clone(),
            tracer.clone(),
            script,
            shutdown.clone(),
            draining.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("ds4-engine".into())
            .spawn(move || w.run(rx, rt))?;
        let model_id = args
            .model_name
            .clone()
            .unwrap_or_else(|| engine.model_name.clone());
        let shared = http::Shared {
            tok: engine.tokenizer,
            display_name: "DeepSeek V4 Flash".into(),
            model_id,
            jobs: tx,
            metrics,
            toolmem,
            store,
            chat_seq: Default::default(),
            cmpl_seq: Default::default(),
            req_seq: Default::default(),
            draining,
            shutdown,
            tracing: tracer.is_some(),
            prepare_slots: tokio::sync::Semaphore::new(http::prepare_parallelism()),
            args,
        };
        Ok(Server {
            state: AppState(Arc::new(shared)),
            worker: Some(handle),
        })
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The router over this server's state.
    pub fn router(&self) -> axum::Router {
        router(self.state.clone())
    }

    /// Stop: refuse new requests, let queued and running jobs finish for up to `grace`, then
    /// abort what is left, write the shutdown checkpoint and join the worker.
    pub async fn shutdown(mut self, grace: Duration) {
        self.state.draining.cancel();
        let hard = self.state.shutdown.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            hard.cancel();
        });
        if let Some(w) = self.worker.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        timer.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Make the worker stop if the server is dropped without `shutdown`.
        self.state.draining.cancel();
        self.state.shutdown.cancel();
    }
}

/// The bind address: an IP literal, or `localhost` (127.0.0.1).
pub fn bind_addr(host: &str, port: u16) -> Result<SocketAddr, ServerError> {
    let ip: IpAddr = if host == "localhost" {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| ServerError::BadOption(format!("--host {host}: not an IP address")))?
    };
    Ok(SocketAddr::new(ip, port))
}

/// Serve on a bound listener until `signal` resolves, then drain (bounded by
/// `--shutdown-grace-secs`), write the shutdown checkpoint and return.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    mut server: Server,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let app = server.router();
    let st = server.state.clone();
    let grace = Duration::from_secs(st.args.shutdown_grace_secs);
    let (draining, hard) = (st.draining.clone(), st.shutdown.clone());
    tokio::spawn(async move {
        signal.await;
        tracing::info!(target: "ds4_server", "shutting down: draining in-flight requests (up to {}s)", grace.as_secs());
        draining.cancel();
        tokio::time::sleep(grace).await;
        tracing::warn!(target: "ds4_server", "drain time is over: stopping the running request");
        hard.cancel();
    });
    let header_timeout =
        (st.args.header_timeout_secs > 0).then(|| Duration::from_secs(st.args.header_timeout_secs));
    let srv = accept_loop(listener, app, header_timeout, st.draining.clone());
    let mut srv_task = tokio::spawn(srv);
    tokio::select! {
        _ = st.draining.cancelled() => {}
        r = &mut srv_task => {
            st.draining.cancel();
            st.shutdown.cancel();
            if let Some(w) = server.worker.take() {
                let _ = tokio::task::spawn_blocking(move || w.join()).await;
            }
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ServerError::Io(e)),
                Err(e) => Err(ServerError::Io(std::io::Error::other(e.to_string()))),
            };
        }
    }
    if let Some(w) = server.worker.take() {
        let _ = tokio::task::spawn_blocking(move || w.join()).await;
    }
    // Let the last SSE events go out; open connections do not hold the exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), srv_task).await;
    tracing::info!(target: "ds4_server", "stopped");
    Ok(())
}

/// Serve HTTP/1.1 connections of `listener` with `app` until `stop`, then let each connection
/// finish its request in flight (graceful shutdown) and return when all are closed. As
/// `axum::serve`, plus hyper's header read timeout (`--header-timeout-secs`), which axum's
/// server does not set: a client that stalls inside a request head, or leaves a keep-alive
/// connection idle, does not hold the connection forever. The timer runs only while hyper
/// waits for a request head, never while a request is processed or its response (an SSE
/// stream included) is written. Sockets get TCP_NODELAY (streamed events go out at once).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: Option<Duration>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // Every connection task holds a receiver: the sender sees them all gone.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        let io = match accepted {
            Ok((io, _)) => io,
            Err(e) => {
                // Per-connection failures (reset before accept): go on. Others (out of file
                // descriptors): wait a little, as axum::serve does.
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) {
                    tracing::warn!(target: "ds4_server", "accept failed: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                continue;
            }
        };
        let _ = io.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let (stop, open) = (stop.clone(), open_rx.clone());
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = b.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            // A header timeout, a client gone mid-request: the connection's own business.
            if let Err(e) = r {
                tracing::debug!(target: "ds4_server", "connection closed: {e}");
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}

/// SIGINT or SIGTERM (a second one exits at once with status 130).
pub async fn shutdown_signal() {
    wait_signal().await;
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("ds4-server: second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `ds4 serve`: start the engine, listen, serve until SIGINT/SIGTERM, drain, write the shutdown
/// checkpoint, return. Blocking; owns its tokio runtime.
pub fn serve(args: ServeArgs, engine: EngineBundle) -> Result<(), ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ds4-http")
        .build()?;
    rt.block_on(async move {
        let addr = bind_addr(&args.host, args.port)?;
        let server = Server::start(args, engine)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        let local = listener.local_addr()?;
        tracing::info!(target: "ds4_server", "listening on http://{local}");
        eprintln!("ds4-server: listening on http://{local}");
        serve_on(listener, server, shutdown_signal()).await
    })
}
