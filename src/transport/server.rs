//! The gRPC server: ImageService behind admission (src/admission.rs), gRPC health, reflection, the admin
//! endpoint, and the shutdown sequence Kubernetes expects. One serve path for the binary, the
//! tests and the benchmark: [`bind`], then [`Bound::serve`] over a registry stack.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::access::authz::Authorizer;
use crate::access::identity::IdentitySource;
use crate::api::audit::{Audit, AuditSink};
use crate::api::methods::MAX_REQUEST_BYTES;
use crate::api::paging::PageTokens;
use crate::api::pb::image_service_server::ImageServiceServer;
use crate::api::service::ImageService;
use crate::api::watch::{SharedPolls, WatchHub, WatchSettings};
use crate::metrics;
use crate::registry::SharedRegistry;
use crate::transport::admin;
use crate::transport::admission::{Admission, AdmissionLimits};
use crate::transport::connection::{ConnectionLimits, Listener};
use crate::transport::http2::{self, Dispatch, Http2Limits};
use crate::transport::tls::{self, TlsFiles, TlsSettings};

/// gRPC's conventional port, on every interface: in a pod, the kubelet's probes and the mesh
/// sidecar reach the server through the pod IP, not loopback.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 50051));
/// The admin port (`/metrics`), apart from gRPC so that it is never routed through the gRPC
/// Service or the mesh's gRPC routes; 9090 is where Prometheus scrape configs look first.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9090));
/// A request without a `grpc-timeout` still ends: later than the ECR operation timeout, so
/// that an ECR failure is reported with its own reason rather than as a bare deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);
/// Requests in flight at once, a backstop only: what is expensive is limited apart (request
/// bytes by [`DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT`], distinct ECR calls by the cache's
/// `max_upstream_calls`). A request waiting on a shared read or served from the cache costs
/// ~3 KB (measured: a herd of 10,000 on one tag grew resident memory by 29 MiB), so 16,384
/// hold at most ~48 MiB, and a rollout's herd of 10,000 on one cold tag is never shed.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 16_384;
/// Request bytes held at once. A request's body is held about three times over while it is
/// worked on (received, decoded, sent to the backend), so 32 MiB of bodies is about 96 MiB of
/// memory: with the 64 MiB digest cache and the process's ~96 MiB (runtime, tag cache, waiting
/// requests), within the chart's 256 Mi
/// limit (the arithmetic is in the chart's values). Seven 4 MiB puts at once are more than
/// ECR's 10 PutImage/s quota can take anyway; a herd of small reads needs a few hundred bytes
/// each.
pub const DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT: usize = 32 << 20;
/// A request's body follows its headers at once from any healthy client; one that has not
/// arrived after 5 s is a stalled or hostile client, and waiting longer only holds its bytes.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once on the gRPC port: sidecars and pooled clients hold a few each, so
/// 1,000 is far above a normal fleet's need and far below a pod's descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// How long a new connection has to send the HTTP/2 preface: a client sends it at once, so
/// a connection that has sent nothing after 5 s is idle or half-open.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The HTTP/2 client preface (RFC 9113 §3.4).
const HTTP2_PREFACE_BYTES: usize = 24;
/// Connections open at once on the admin port: Prometheus needs one or two.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A connection is closed gracefully (GOAWAY) after this long, so that clients reconnect and
/// spread over replicas added since, as gRPC's `MAX_CONNECTION_AGE` is used for.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);
/// What a connection past its age has left to finish its streams: past every default deadline.
const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(60);
/// Kubernetes removes a terminating pod from endpoints while it sends SIGTERM; proxies keep
/// sending for a few seconds. Serving (as NOT_SERVING) that long loses none of that traffic.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);
/// In-flight requests get this long to finish; with the delay it fits Kubernetes' default
/// 30 s termination grace period.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// HTTP/2 pings on idle connections: finds a dead peer (a restarted sidecar, a vanished node)
/// in well under a minute, and keeps connections alive through load balancers' idle timeouts
/// (60 s for an ALB).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams per connection: a sidecar multiplexes many callers over few connections, and this
/// bounds what one connection can hold, below the global concurrency limit.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Limits and timings of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Where gRPC is served.
    pub listen: SocketAddr,
    /// Where the admin endpoint (`/metrics`) is served.
    pub admin_listen: SocketAddr,
    /// ImageService requests in flight at once; more are shed with UNAVAILABLE.
    pub max_concurrent_requests: usize,
    /// Request bytes held at once; a request that would pass it is shed with UNAVAILABLE.
    pub max_request_bytes_in_flight: usize,
    /// How long a request's body may take to arrive after its headers.
    pub request_body_timeout: Duration,
    /// Connections open at once on the gRPC port.
    pub max_connections: usize,
    /// The deadline of a request that brings none.
    pub default_deadline: Duration,
    /// After the shutdown signal, how long to keep serving while health reports NOT_SERVING,
    /// so that probes and endpoints see the change before connections are refused.
    pub shutdown_delay: Duration,
    /// After that, how long in-flight requests have to finish before the server stops anyway.
    pub shutdown_grace: Duration,
    /// Serve gRPC reflection (v1, and v1alpha for older clients), so that grpcurl and
    /// `buf curl` work without the proto files.
    pub reflection: bool,
    /// Where callers' identities come from.
    pub identity_source: IdentitySource,
    /// The authorization policy file; none allows every caller everything.
    pub authz_policy: Option<PathBuf>,
    /// The service's own mutual TLS (with `--identity-source mtls`); none serves plaintext.
    pub tls: Option<TlsSettings>,
    /// The key that signs page tokens, shared by replicas; none draws a random one per process.
    pub page_token_key: Option<PathBuf>,
    /// WatchTag's poll and heartbeat intervals and its cap.
    pub watch: WatchSettings,
    /// The account the service serves (its credentials' own). A request naming it is the same
    /// as one naming none; one naming another is refused with REGISTRY_NOT_CONFIGURED. `None`
    /// (not known): every request naming a registry is refused that way.
    pub own_registry_id: Option<String>,
    /// Whether every write and denial is an audit event on stderr.
    pub audit: bool,
    /// How long a verification verdict stands.
    pub verdict_ttl: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            admin_listen: DEFAULT_ADMIN_LISTEN,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            max_request_bytes_in_flight: DEFAULT_MAX_REQUEST_BYTES_IN_FLIGHT,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            default_deadline: DEFAULT_DEADLINE,
            shutdown_delay: DEFAULT_SHUTDOWN_DELAY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            reflection: true,
            identity_source: IdentitySource::None,
            authz_policy: None,
            tls: None,
            page_token_key: None,
            watch: WatchSettings::default(),
            own_registry_id: None,
            audit: true,
            verdict_ttl: crate::access::verify::DEFAULT_VERDICT_TTL,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The authorization policy cannot be read or is invalid.
    #[error("--authz-policy: {0}")]
    Policy(String),
    /// The TLS files cannot be read or do not make a configuration.
    #[error("--tls-cert, --tls-key, --tls-client-ca: {0}")]
    Tls(String),
    /// The page-token key cannot be read or is too short.
    #[error("--page-token-key-file: {0}")]
    PageTokens(String),
}

/// Both listeners, bound: the addresses are known (port 0 picks one) before anything serves.
#[derive(Debug)]
pub struct Bound {
    grpc: TcpListener,
    admin: TcpListener,
    authorizer: Arc<Authorizer>,
    tls: Option<Arc<TlsFiles>>,
    pages: PageTokens,
    settings: ServerSettings,
    polls: Option<Arc<dyn SharedPolls>>,
    routes: Option<Arc<crate::registry::accounts::Routes>>,
    audit_sink: Option<Arc<dyn AuditSink>>,
}

/// The files the server reads at start (policy, page-token key, TLS), each read once, here:
/// the binary loads them before anything starts, so that a bad file is one line and exit 64.
#[derive(Debug)]
pub struct Loaded {
    authorizer: Authorizer,
    pages: PageTokens,
    tls: Option<TlsFiles>,
}

impl Loaded {
    /// Whether the policy read verifies images (a `verify:` rule not `off`).
    pub fn verifies(&self) -> bool {
        self.authorizer.verifies()
    }

    /// Reads and checks the files `settings` names.
    pub fn load(settings: &ServerSettings) -> Result<Self, ServeError> {
        let authorizer = match &settings.authz_policy {
            Some(path) => Authorizer::from_file(path).map_err(ServeError::Policy)?,
            None => Authorizer::allow_all(),
        };
        let pages = match &settings.page_token_key {
            Some(path) => PageTokens::from_file(path),
            None => PageTokens::random(),
        }
        .map_err(ServeError::PageTokens)?;
        let tls = match &settings.tls {
            Some(files) => Some(TlsFiles::load(files.clone()).map_err(ServeError::Tls)?),
            None => None,
        };
        Ok(Self {
            authorizer,
            pages,
            tls,
        })
    }
}

/// Loads the files of `settings` and binds its gRPC and admin listeners.
pub async fn bind(settings: ServerSettings) -> Result<Bound, ServeError> {
    let loaded = Loaded::load(&settings)?;
    bind_loaded(settings, loaded).await
}

/// Binds the gRPC and admin listeners of `settings`, serving with the files already `loaded`.
pub async fn bind_loaded(settings: ServerSettings, loaded: Loaded) -> Result<Bound, ServeError> {
    let Loaded {
        authorizer,
        pages,
        tls,
    } = loaded;
    let tls = tls.map(Arc::new);
    let listen = |address: SocketAddr| async move {
        TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::Bind { address, source })
    };
    Ok(Bound {
        grpc: listen(settings.listen).await?,
        admin: listen(settings.admin_listen).await?,
        authorizer: Arc::new(authorizer),
        tls,
        pages,
        settings,
        polls: None,
        routes: None,
        audit_sink: None,
    })
}

impl Bound {
    /// WatchTag polling in turn with the fleet's other replicas, through `polls`.
    pub fn with_shared_polls(mut self, polls: Arc<dyn SharedPolls>) -> Self {
        self.polls = Some(polls);
        self
    }

    /// Audit events written to `sink` instead of stderr (tests read them there).
    pub fn with_audit_sink(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit_sink = Some(sink);
        self
    }

    /// Serving the registries `routes` names (default: the own registry of the settings).
    pub fn with_routes(mut self, routes: Arc<crate::registry::accounts::Routes>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Where gRPC is served.
    pub fn address(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.settings.listen)
    }

    /// Where `/metrics` is served.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.settings.admin_listen)
    }

    /// Serves `registry` until `shutdown` completes (see [`serve`]), and `/metrics` with the
    /// metrics of every layer of `registry` until the process ends.
    pub async fn serve(self, registry: SharedRegistry, shutdown: impl Future<Output = ()> + Send) {
        let mut metrics = metrics::registry(|metrics| registry.register_metrics(metrics));
        self.authorizer.register_metrics(&mut metrics);
        let audit = match (self.settings.audit, self.audit_sink) {
            (false, _) => Audit::off(),
            (true, None) => Audit::default(),
            (true, Some(sink)) => Audit::to(Some(sink)),
        };
        audit.register_metrics(&mut metrics);
        let verifier = Arc::new(crate::access::verify::Verifier::new(
            Arc::clone(&registry),
            self.settings.verdict_ttl,
        ));
        verifier.register_metrics(&mut metrics);
        let admin = Listener::new(
            self.admin,
            ConnectionLimits {
                max_connections: MAX_ADMIN_CONNECTIONS,
                handshake_timeout: admin::HEADER_READ_TIMEOUT,
                handshake_bytes: 1,
            },
        );
        tokio::spawn(admin::serve(admin, metrics));
        tokio::spawn(crate::memory::give_back_after_herds());
        self.authorizer.announce();
        tokio::spawn(Arc::clone(&self.authorizer).watch());
        let hub = WatchHub::shared(Arc::clone(&registry), self.settings.watch, self.polls);
        hub.subscribe_to(&*registry);
        let closing = Arc::clone(&hub);
        // Watches end first, so that their streams do not hold the drain open.
        let shutdown = async move {
            shutdown.await;
            closing.close();
        };
        let routes = self.routes.unwrap_or_else(|| {
            let own = self.settings.own_registry_id.clone();
            Arc::new(crate::registry::accounts::Routes::own(own, None))
        });
        tokio::spawn(Arc::clone(&routes).watch());
        let service = ImageService::new(
            registry,
            self.settings.default_deadline,
            self.pages,
            hub,
            verifier,
        )
        .with_access(self.settings.identity_source, self.authorizer)
        .with_audit(audit)
        .serving(routes);
        if let Some(files) = &self.tls {
            tokio::spawn(Arc::clone(files).watch());
        }
        serve(self.grpc, service, self.settings, self.tls, shutdown).await;
    }
}

/// Reflection services describing ImageService and health, if enabled.
fn reflection(
    enabled: bool,
) -> Result<
    (
        Option<
            tonic_reflection::server::v1::ServerReflectionServer<
                impl tonic_reflection::server::v1::ServerReflection,
            >,
        >,
        Option<
            tonic_reflection::server::v1alpha::ServerReflectionServer<
                impl tonic_reflection::server::v1alpha::ServerReflection,
            >,
        >,
    ),
    tonic_reflection::server::Error,
> {
    if !enabled {
        return Ok((None, None));
    }
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((
        Some(builder().build_v1()?),
        Some(builder().build_v1alpha()?),
    ))
}

/// Serves the API on `listener` until `shutdown` completes, then: health turns NOT_SERVING,
/// requests are still served for `shutdown_delay`, new connections are refused, in-flight
/// requests get `shutdown_grace` to finish, and the function returns.
pub async fn serve(
    listener: TcpListener,
    service: ImageService,
    settings: ServerSettings,
    tls: Option<Arc<TlsFiles>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ImageServiceServer<ImageService>>()
        .await;
    let images = ImageServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES);
    let images = Admission::new(
        images,
        AdmissionLimits {
            max_concurrent_requests: settings.max_concurrent_requests,
            max_request_bytes_in_flight: settings.max_request_bytes_in_flight,
            identity_source: settings.identity_source,
            body_timeout: settings.request_body_timeout,
            default_deadline: settings.default_deadline,
            retry_after: crate::registry::RETRY_SOON,
        },
    );
    let incoming = Listener::new(
        listener,
        ConnectionLimits {
            max_connections: settings.max_connections,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshake_bytes: HTTP2_PREFACE_BYTES,
        },
    );
    // The descriptor sets are compiled in; failing to read them is a build defect, reported
    // as a server error rather than a panic.
    let (reflection_v1, reflection_v1alpha) = reflection(settings.reflection)
        .map_err(|e| tracing::error!(error = %e, "gRPC reflection unavailable"))
        .unwrap_or((None, None));
    let mut others = Routes::new(health_service);
    if let Some(v1) = reflection_v1 {
        others = others.add_service(v1);
    }
    if let Some(v1alpha) = reflection_v1alpha {
        others = others.add_service(v1alpha);
    }
    let dispatch = Dispatch::new(images, others.prepare());

    let draining = Arc::new(Notify::new());
    let drain_started = Arc::clone(&draining);
    let (delay, grace) = (settings.shutdown_delay, settings.shutdown_grace);
    let stop_accepting = async move {
        shutdown.await;
        health
            .set_not_serving::<ImageServiceServer<ImageService>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        info!(?delay, ?grace, "draining: health is NOT_SERVING");
        tokio::time::sleep(delay).await;
        info!("refusing new connections; waiting for in-flight requests");
        drain_started.notify_one();
    };
    let limits = Http2Limits {
        max_streams: MAX_STREAMS_PER_CONNECTION,
        keepalive_interval: KEEPALIVE_INTERVAL,
        keepalive_timeout: KEEPALIVE_TIMEOUT,
        max_age: MAX_CONNECTION_AGE,
        max_age_grace: MAX_CONNECTION_AGE_GRACE,
    };
    let server = async move {
        match tls {
            Some(files) => {
                let incoming = tls::incoming(incoming, files, HANDSHAKE_TIMEOUT);
                http2::serve(incoming, dispatch, limits, stop_accepting).await;
            }
            None => http2::serve(incoming.into_stream(), dispatch, limits, stop_accepting).await,
        }
    };
    tokio::select! {
        () = server => {}
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            warn!(?grace, "grace period over: stopping with requests still in flight");
        }
    }
}
