//! Serving gRPC's HTTP/2 connections with hyper, so that what a connection read at once is
//! answered in one write.
//!
//! hyper hands each new stream (request) to an executor. tonic's server spawns it as a task;
//! Tokio's multi-threaded scheduler then runs that task at once (its LIFO slot), and the
//! connection's task right after it, which writes that one answer: one `writev`, and a wake-up
//! of the peer, per answer. Here the executor only queues the stream, and the connection's own
//! task polls it once when hyper is done with what the socket held. A stream that finishes
//! in that poll (a cached read does) has queued its answer, and the next turn of the connection
//! writes every answer of the batch together. A stream that waits (a read of ECR, a watch, a
//! body still arriving) is spawned as its own task from there, as tonic would have, so a slow
//! request never holds the connection.
//!
//! The price: a connection's first polls run on the thread that runs the connection, where
//! tonic's stream tasks could be stolen by an idle worker. For cached reads (a few
//! microseconds) that is the point. For expensive requests it would give a client that uses one
//! connection one core however many the pod has, so a connection whose first polls turn slow
//! (over 50 us, twice in a row) spawns its next 64 streams as tonic would, then tries again.
//!
//! The rest is what tonic's `Server` did for us: HTTP/2 keepalive, the per-connection stream
//! limit, a maximum connection age (GOAWAY, then a grace period), the connection's addresses in
//! each request's extensions, and a graceful stop.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::{Stream, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::Service as _;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::Connected;

/// How often a connection turns (serves what it read, first-polls the new streams) in one
/// wake-up of its task before it lets other tasks run: enough for the answers of one read to
/// be written in the same wake-up, few enough that a busy connection does not hold a worker.
const TURNS_PER_WAKE: usize = 4;

/// A first poll longer than this did real work (a cached read's takes a few microseconds):
/// worth a task of its own that another worker can take, at the price of a spawn (~1 us) and a
/// write of its own.
const SLOW_FIRST_POLL: Duration = Duration::from_micros(50);
/// Slow first polls in a row that make a connection spawn its streams: two, because one can be
/// the thread being preempted mid-poll (on a shared core, about one poll in a few hundred).
const SLOW_IN_A_ROW: u8 = 2;
/// Streams a connection then spawns before it tries a first poll again: enough to spread a run
/// of expensive requests over the workers, few enough to be back to batching soon after.
const SPAWNED_AFTER_SLOW: u32 = 64;

/// The HTTP/2 settings of the gRPC port.
#[derive(Debug, Clone, Copy)]
pub struct Http2Limits {
    /// Streams open at once on one connection.
    pub max_streams: u32,
    /// How often an idle connection is pinged.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// When a connection is asked to go away (GOAWAY), so that clients spread over new replicas.
    pub max_age: Duration,
    /// What a connection past its age has left to finish its streams before it is closed.
    pub max_age_grace: Duration,
}

/// One request's route: ImageService's own stack, or tonic's router for the rest (health,
/// reflection, and UNIMPLEMENTED for anything else).
#[derive(Clone)]
pub struct Dispatch<S> {
    images: S,
    others: Routes,
}

impl<S> Dispatch<S>
where
    S: tonic::codegen::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone,
{
    /// Requests for `images`'s service go to it directly; the rest to `others`.
    pub fn new(images: S, others: Routes) -> Self {
        Self { images, others }
    }
}

/// Whether `path` names a method of `service` (`/<package.Service>/<Method>`).
fn is_method_of(path: &str, service: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|rest| rest.strip_prefix(service))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// A [`Dispatch`] for one connection: each request also carries the connection's addresses
/// (and client certificate), where tonic's `Request::remote_addr` and admission look for them.
struct ConnectionService<S, C> {
    dispatch: Dispatch<S>,
    info: C,
}

impl<S, C> hyper::service::Service<Request<Incoming>> for ConnectionService<S, C>
where
    S: tonic::codegen::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone,
    C: Clone + Send + Sync + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, <Routes as tonic::codegen::Service<Request<Incoming>>>::Future>;

    // Both services are always ready (tonic's generated servers and axum's router say so
    // unconditionally), so each request calls a clone without waiting on `poll_ready`.
    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.info.clone());
        if is_method_of(request.uri().path(), S::NAME) {
            Either::Left(self.dispatch.images.clone().call(request))
        } else {
            Either::Right(self.dispatch.others.clone().call(request))
        }
    }
}

/// A stream as hyper hands it over.
type StreamTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection: streams wait here for their first poll on the
/// connection's task.
#[derive(Clone, Default)]
struct Accepted {
    streams: Arc<Mutex<Vec<StreamTask>>>,
}

impl Accepted {
    fn take(&self) -> Vec<StreamTask> {
        // Never held across anything that could panic, so never poisoned; if it were, the
        // queue is still a plain Vec.
        std::mem::take(&mut *self.streams.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<F> hyper::rt::Executor<F> for Accepted
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(stream));
    }
}

/// Polls `stream` once; if it is not done, it becomes a task of its own. It is polled with a
/// waker that does nothing: the task's first poll registers the real one.
fn first_poll(mut stream: StreamTask) {
    let mut cx = Context::from_waker(Waker::noop());
    // A handler that panics takes down its stream (reset when dropped), not the connection,
    // as it would have in a task of its own.
    match std::panic::catch_unwind(AssertUnwindSafe(|| stream.as_mut().poll(&mut cx))) {
        Ok(Poll::Ready(())) => {}
        Ok(Poll::Pending) => {
            tokio::spawn(stream);
        }
        Err(_) => tracing::error!("a request's handler panicked; its stream was reset"),
    }
}

/// Whether a connection's next stream gets its first poll inline: yes, unless its recent
/// first polls were slow. A client that sends expensive requests over one connection (a
/// platform looked up in an index of thousands, say) would otherwise get one core however many
/// the pod has: measured on 2 cores, 2 clients sharing a connection got 0.53-0.73x the answers
/// tonic's server gave them; with this, 1.14-1.15x.
#[derive(Debug, Default)]
struct InlinePolls {
    slow_in_a_row: u8,
    to_spawn: u32,
}

impl InlinePolls {
    /// Whether to poll the next stream inline; if not, it is spawned.
    fn next_inline(&mut self) -> bool {
        if self.to_spawn == 0 {
            return true;
        }
        self.to_spawn -= 1;
        false
    }

    /// How long an inline first poll took.
    fn took(&mut self, elapsed: Duration) {
        if elapsed <= SLOW_FIRST_POLL {
            self.slow_in_a_row = 0;
            return;
        }
        self.slow_in_a_row += 1;
        if self.slow_in_a_row >= SLOW_IN_A_ROW {
            self.slow_in_a_row = 0;
            self.to_spawn = SPAWNED_AFTER_SLOW;
        }
    }
}

/// A connection whose new streams get their first poll on its own task (see the module's doc).
struct Turning<C> {
    connection: Pin<Box<C>>,
    accepted: Accepted,
    inline: InlinePolls,
}

impl<C: Future> Future for Turning<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        for _ in 0..TURNS_PER_WAKE {
            let state = self.connection.as_mut().poll(cx);
            let streams = self.accepted.take();
            if streams.is_empty() {
                return state;
            }
            for stream in streams {
                if self.inline.next_inline() {
                    let started = std::time::Instant::now();
                    first_poll(stream);
                    self.inline.took(started.elapsed());
                } else {
                    tokio::spawn(stream);
                }
            }
            if state.is_ready() {
                return state;
            }
        }
        // Answers may be waiting to be written: come back after the other tasks have run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Serves the connections of `incoming` until `stop` completes, then asks each to go away
/// (GOAWAY) and returns when all have closed.
pub async fn serve<I, IO, S>(
    incoming: I,
    dispatch: Dispatch<S>,
    limits: Http2Limits,
    stop: impl Future<Output = ()>,
) where
    I: Stream<Item = Result<IO, Infallible>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    S: tonic::codegen::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (stopping, stop_seen) = watch::channel(());
    {
        // Dropped when the loop ends: the listener closes, and the kernel stops accepting.
        let mut incoming = pin!(incoming);
        let mut stop = pin!(stop);
        loop {
            let io = tokio::select! {
                () = &mut stop => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    None => break,
                },
            };
            let service = ConnectionService {
                dispatch: dispatch.clone(),
                info: io.connect_info(),
            };
            tokio::spawn(serve_connection(io, service, limits, stop_seen.clone()));
        }
    }
    let _ = stopping.send(());
    drop(stop_seen);
    stopping.closed().await;
}

/// Serves one connection: until it closes, is past its age and grace, or the server stops
/// and its streams are done.
async fn serve_connection<IO, S, C>(
    io: IO,
    service: ConnectionService<S, C>,
    limits: Http2Limits,
    mut stop: watch::Receiver<()>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tonic::codegen::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    C: Clone + Send + Sync + 'static,
{
    let accepted = Accepted::default();
    let connection = http2::Builder::new(accepted.clone())
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = Turning {
        connection: Box::pin(connection),
        accepted,
        inline: InlinePolls::default(),
    };
    let age = tokio::time::sleep(limits.max_age);
    let mut age = pin!(age);
    let mut going_away = false;
    let mut stopping = false;
    loop {
        tokio::select! {
            served = &mut connection => {
                if let Err(err) = served {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            () = &mut age => {
                if going_away {
                    tracing::debug!("connection closed: its grace period after its age is over");
                    return;
                }
                connection.connection.as_mut().graceful_shutdown();
                going_away = true;
                let grace = tokio::time::Instant::now() + limits.max_age_grace;
                age.as_mut().reset(grace);
            }
            _ = stop.changed(), if !stopping => {
                connection.connection.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use tokio::time::Instant;

    const IMAGES: &str = "imageservice.v1.ImageService";

    #[test]
    fn only_the_images_service_s_paths_go_to_it() {
        assert!(is_method_of(
            "/imageservice.v1.ImageService/GetImage",
            IMAGES
        ));
        assert!(!is_method_of(
            "/imageservice.v1.ImageServiceX/GetImage",
            IMAGES
        ));
        assert!(!is_method_of("/grpc.health.v1.Health/Check", IMAGES));
        assert!(!is_method_of(
            "imageservice.v1.ImageService/GetImage",
            IMAGES
        ));
    }

    /// Where a stream's polls ran: `None` outside any task (inline, in the caller's poll).
    async fn task_of_each_poll(polls: usize, ran: Arc<Mutex<Vec<Option<tokio::task::Id>>>>) {
        for _ in 1..polls {
            ran.lock().unwrap().push(tokio::task::try_id());
            tokio::task::yield_now().await;
        }
        ran.lock().unwrap().push(tokio::task::try_id());
    }

    #[tokio::test]
    async fn a_stream_done_in_its_first_poll_never_becomes_a_task() {
        let ran = Arc::default();
        first_poll(Box::pin(task_of_each_poll(1, Arc::clone(&ran))));
        assert_eq!(*ran.lock().unwrap(), vec![None]);
    }

    #[tokio::test]
    async fn a_stream_that_waits_is_finished_by_a_task_of_its_own() {
        let ran = Arc::<Mutex<Vec<_>>>::default();
        first_poll(Box::pin(task_of_each_poll(2, Arc::clone(&ran))));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ran.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "the stream's task never ran");
            tokio::task::yield_now().await;
        }
        let ran = ran.lock().unwrap();
        assert_eq!(ran[0], None, "the first poll is inline");
        assert!(ran[1].is_some(), "the rest runs in a task: {ran:?}");
    }

    #[tokio::test]
    async fn a_handler_that_panics_drops_its_stream_and_nothing_else() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let guard = Dropped(Arc::clone(&dropped));
        first_poll(Box::pin(async move {
            let _guard = guard;
            panic!("a handler's bug");
        }));
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn slow_first_polls_in_a_row_spawn_the_next_streams_then_inline_again() {
        let (fast, slow) = (Duration::from_micros(5), Duration::from_millis(1));
        let mut inline = InlinePolls::default();
        assert!(inline.next_inline());
        inline.took(slow);
        assert!(inline.next_inline(), "one slow poll may be a preemption");
        inline.took(fast);
        assert!(inline.next_inline());
        inline.took(slow);
        assert!(inline.next_inline());
        inline.took(slow);
        let spawned = std::iter::from_fn(|| Some(inline.next_inline()))
            .take_while(|inline| !inline)
            .count();
        assert_eq!(spawned, SPAWNED_AFTER_SLOW as usize);
        inline.took(fast);
        assert!(inline.next_inline(), "back to batching");
    }

    /// A service whose requests are never answered.
    #[derive(Clone)]
    struct Unanswered;

    impl NamedService for Unanswered {
        const NAME: &'static str = "test.Unanswered";
    }

    impl tonic::codegen::Service<Request<Incoming>> for Unanswered {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Pending<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Incoming>) -> Self::Future {
            std::future::pending()
        }
    }

    const AGE: Duration = Duration::from_secs(600);
    const GRACE: Duration = Duration::from_secs(60);

    /// Serves one connection over an in-memory pipe with a short age; returns when the client
    /// saw it end, `open` streams having been left unanswered.
    async fn connection_ends_after(open: usize) -> Duration {
        let (client, server) = tokio::io::duplex(64 << 10);
        let service = ConnectionService {
            dispatch: Dispatch::new(Unanswered, Routes::default()),
            info: (),
        };
        let limits = Http2Limits {
            max_streams: 16,
            keepalive_interval: Duration::from_secs(3600),
            keepalive_timeout: Duration::from_secs(3600),
            max_age: AGE,
            max_age_grace: GRACE,
        };
        let (_stopping, stop) = watch::channel(());
        let started = Instant::now();
        tokio::spawn(serve_connection(server, service, limits, stop));
        let (mut send, connection) = h2::client::handshake(client).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut streams = Vec::new();
        for _ in 0..open {
            let request = Request::post("/test.Unanswered/Call").body(()).unwrap();
            streams.push(send.send_request(request, true).unwrap());
        }
        // `send` is held: a client that drops it closes an idle connection itself.
        let _ = connection.await.unwrap();
        drop(send);
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_past_its_age_is_asked_to_go_away_and_closes() {
        assert_eq!(connection_ends_after(0).await, AGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_past_its_age_and_grace_is_closed() {
        assert_eq!(connection_ends_after(2).await, AGE + GRACE);
    }
}
