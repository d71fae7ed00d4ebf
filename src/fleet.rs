//! Several replicas through Redis (`--redis-url`): ECR's quotas, tag freshness and WatchTag
//! polling shared by the fleet instead of divided or repeated.
//!
//! - **Budgets.** Every ECR call's slot is taken from a GCRA in Redis, one key per operation
//!   under the account's hash tag (`ecr-image-service:{<account>:<region>}:budget:PutImage`),
//!   on Redis's clock. A replica alone with all the load can use the whole quota. When Redis
//!   errors or takes longer than [`BUDGET_CHECK_TIMEOUT`], the replica paces itself at
//!   quota ÷ N (N the live replicas, from heartbeats; `--rate-share` when unknown) until Redis
//!   answers a heartbeat again. Degraded, never unlimited.
//! - **Tag freshness.** A put, retag or delete through any replica publishes the tag it moved;
//!   every replica drops its resolution of that tag at once. When the subscription drops, a
//!   replica forgets every tag resolution (it may have missed a move). digest → manifest stays
//!   local: it is immutable.
//! - **Polling.** One replica, holding a lease, polls each watched repository for the tags the
//!   whole fleet watches, and publishes what it finds to the others' watchers.
//!
//! Redis is never waited on longer than [`BUDGET_CHECK_TIMEOUT`] and never needed: publishing is
//! fire-and-forget, and a replica whose Redis is down serves as a single replica does.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::api::watch::{SharedPolls, Source, TagState, WatchHub};
use crate::domain::image::{Digest, RegistryId, RepositoryName, Tag};
use crate::metrics;
use crate::registry::RepositoryKey;
use crate::registry::cached::TagInvalidator;
use crate::registry::ecr::budget::{SharedSlots, Slot};
use crate::registry::ecr::lanes::BudgetScopes;
use crate::registry::{TagBus, TagMove};

/// The pub/sub channel of tag moves.
pub const TAG_CHANNEL: &str = "ecr-image-service:tag-moved";
/// The pub/sub channel of WatchTag poll results.
pub const POLL_CHANNEL: &str = "ecr-image-service:tag-polled";
/// How long a budget check, a heartbeat or a publish may take: a slot must come quickly or
/// not from Redis at all, and a write never waits on Redis. A regional Redis answers in about a
/// millisecond; 50 ms means it is hung, overloaded or far away.
pub const BUDGET_CHECK_TIMEOUT: Duration = Duration::from_millis(50);
/// More live replicas than any fleet of this service runs (the chart's HPA stops at 10 by
/// default): a larger count read from Redis is not believed.
const MAX_PLAUSIBLE_REPLICAS: u32 = 256;
/// The most a budget's next slot can honestly lie ahead beyond one interval: a replica back
/// from local pacing owes at most its last second's sends.
const MAX_OWED_WAIT: Duration = Duration::from_secs(1);

/// How often a replica says it is alive.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often a degraded replica asks whether Redis answers again. Until every replica has
/// switched back, those still on their local share send beside the shared quota: a tenth of
/// a second of that stays inside the budgets' pacing headroom.
const DEGRADED_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A replica not heard from for this long is no longer counted: five missed heartbeats.
const HEARTBEAT_TTL: Duration = Duration::from_secs(5);
/// While Redis is down, the live replica count it last gave is trusted this long; after that
/// the fleet may have grown, and the share is `--rate-share` (the HPA's maximum) or more.
const REPLICAS_FRESH_FOR: Duration = Duration::from_secs(60);
/// The fleet's watched tags of one repository a poller reads at most: 10 BatchGetImage a poll.
/// Redis holds what replicas register, or anyone who can write to it: 20,000 fake tags drove
/// 100-200 BatchGetImage a second. A replica's own watched tags are polled whatever this cap.
const MAX_FLEET_TAGS_PER_REPOSITORY: usize = 1_000;
/// A poll result larger than this is no poll result (tag, digest, times, media type fit in
/// well under 1 KiB); a 6 MB one broke the watchers' streams.
const MAX_POLL_MESSAGE_BYTES: usize = 4096;
/// RFC 6838 bounds a media type's type and subtype at 127 characters each.
const MAX_MEDIA_TYPE_BYTES: usize = 255;
/// How far ahead of this replica's clock a poll result's times may be.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// How long to wait before subscribing again after a failure.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// The command connection's own bounds, behind [`BUDGET_CHECK_TIMEOUT`]: a connection attempt
/// to a live Redis takes milliseconds, even with TLS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// GCRA without burst, several slots a round trip: `KEYS[1]` holds the theoretical arrival
/// time (TAT), microseconds of Redis's clock; `ARGV` are the slot interval in microseconds, the
/// slots wanted, and the horizon in microseconds. The slots granted are the next ones of the
/// fleet's schedule, an interval apart from the TAT (or now, if it has passed), as many as are
/// wanted and due within the horizon; the TAT moves past the last. Grants are an interval apart
/// fleet-wide whatever the replicas' clocks: each replica sends its slots at their times.
/// Returns `{n, µs until the first}`, or `{0, µs until one is due within the horizon}`. With
/// one wanted and no horizon it is the one-slot GCRA of earlier versions, on the same key.
static TAKE_SLOTS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local wanted = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call("GET", KEYS[1]) or "0")
local first = math.max(tat, now)
if first > now + horizon then
  return {0, first - now - horizon}
end
local n = math.min(wanted, math.floor((now + horizon - first) / interval) + 1)
local last = first + n * interval
redis.call("SET", KEYS[1], string.format("%.0f", last), "PX", math.ceil((last - now) / 1000) + 1000)
return {n, first - now}
"#,
    )
});

/// Hands a granted slot back: the TAT moves one interval earlier, so the next request (of
/// any replica) can have it.
static GIVE_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call("GET", KEYS[1]) or "0") - tonumber(ARGV[1])
if tat > now then
  redis.call("SET", KEYS[1], string.format("%.0f", tat), "PX", math.ceil((tat - now) / 1000) + 1000)
else
  redis.call("DEL", KEYS[1])
end
return 1
"#,
    )
});

/// Local sends the limiter did not see, counted as made now: `ARGV[1]` sends of `ARGV[2]`
/// microseconds each push the TAT on from now (or from itself, when later).
static OWE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = math.max(tonumber(redis.call("GET", KEYS[1]) or "0"), now) + tonumber(ARGV[1]) * tonumber(ARGV[2])
redis.call("SET", KEYS[1], string.format("%.0f", tat), "PX", math.ceil((tat - now) / 1000) + 1000)
return 1
"#,
    )
});

/// A heartbeat: `KEYS[1]` is a sorted set of replicas by last beat (ms of Redis's clock);
/// `ARGV[1]` this replica, `ARGV[2]` how long a beat counts. Returns the live replicas.
static HEARTBEAT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call("ZADD", KEYS[1], now, ARGV[1])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now - ttl)
redis.call("PEXPIRE", KEYS[1], ttl * 2)
return redis.call("ZCARD", KEYS[1])
"#,
    )
});

/// A poller's turn: `KEYS[1]` is a repository's poll lease, `KEYS[2]` the tags the fleet
/// watches in it (a sorted set by expiry, ms of Redis's clock); `ARGV[1]` this replica,
/// `ARGV[2]` the lease's time to live, `ARGV[3]` how many tags to return at most, `ARGV[4..]`
/// the tags this replica watches. Registers them; takes or renews the lease when free or held;
/// a replica with no tag left lets it go. Returns `{1, the watched tags}` to the holder, `{0}`
/// to the others.
static POLL_TURN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i = 4, #ARGV do
  redis.call("ZADD", KEYS[2], now + ttl, ARGV[i])
end
redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", now)
redis.call("PEXPIRE", KEYS[2], ttl)
local holder = redis.call("GET", KEYS[1])
if #ARGV < 4 then
  if holder == ARGV[1] then redis.call("DEL", KEYS[1]) end
  return {0}
end
if holder and holder ~= ARGV[1] then
  return {0}
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ttl)
local tags = redis.call("ZRANGE", KEYS[2], 0, tonumber(ARGV[3]) - 1)
table.insert(tags, 1, 1)
return tags
"#,
    )
});

/// One replica's link to the others.
pub struct Fleet {
    client: redis::Client,
    /// Commands: budget checks, heartbeats, leases, publishes. Reconnects by itself.
    commands: ConnectionManager,
    /// This process, so that it ignores its own messages and counts once.
    origin: String,
    /// `<account>:<region>`: the hash tag of every key, so that one account's keys share a
    /// Redis Cluster slot and a script can touch several.
    scope: String,
    state: Arc<Mode>,
    hub: OnceLock<Weak<WatchHub>>,
}

/// Whether budgets are shared now, and the live replica count for when they are not.
struct Mode {
    shared: AtomicBool,
    replicas: AtomicU32,
    heard_at: Mutex<Option<Instant>>,
    rate_share: u32,
}

/// A client of the Redis at `url` (`redis://`, `rediss://`, or `unix://` for a socket); for
/// `rediss://`, trusting the PEM certificates `ca` instead of the system's roots when given
/// (a private CA; ElastiCache's certificates chain to the public roots).
pub fn client(url: &str, ca: Option<&[u8]>) -> Result<redis::Client, String> {
    match ca {
        None => redis::Client::open(url),
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        ),
    }
    .map_err(|e| e.to_string())
}

impl Fleet {
    /// A link through the Redis at `url` (see [`client`]) for the ECR account and region in
    /// `scope` (`<account>:<region>`).
    pub fn new(url: &str, scope: &str, rate_share: u32) -> Result<Arc<Self>, String> {
        Self::with_client(client(url, None)?, scope, rate_share)
    }

    /// A link through `client` for the ECR account and region in `scope`. Budgets run at
    /// quota ÷ `rate_share` until Redis first answers. Connections are made in the background
    /// and retried.
    pub fn with_client(
        client: redis::Client,
        scope: &str,
        rate_share: u32,
    ) -> Result<Arc<Self>, String> {
        // Few, short reconnection attempts: the heartbeat starts another soon, and one left
        // in a long backoff would delay the switch back after Redis returns.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(CONNECT_TIMEOUT);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| e.to_string())?;
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|e| e.to_string())?;
        metrics::budget_mode(false);
        Ok(Arc::new(Self {
            client,
            commands,
            origin: origin.iter().map(|b| format!("{b:02x}")).collect(),
            scope: scope.to_owned(),
            state: Arc::new(Mode {
                shared: AtomicBool::new(false),
                replicas: AtomicU32::new(0),
                heard_at: Mutex::new(None),
                rate_share: rate_share.max(1),
            }),
            hub: OnceLock::new(),
        }))
    }

    /// `ecr-image-service:{<account>:<region>}:<what>`.
    fn key(&self, what: &str) -> String {
        format!("ecr-image-service:{{{}}}:{what}", self.scope)
    }

    /// Starts the heartbeats, and listening for other replicas' tag moves (dropped from
    /// `tags`) and poll results.
    pub fn listen(self: &Arc<Self>, tags: TagInvalidator) {
        tokio::spawn(Arc::clone(self).heartbeats());
        let fleet = Arc::clone(self);
        tokio::spawn(async move {
            let mut reported = false;
            loop {
                match fleet.subscribe(&tags).await {
                    Ok(()) => reported = false,
                    Err(err) if !reported => {
                        tracing::warn!(error = %err, "Redis: tag moves and poll results are not shared until it answers");
                        reported = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        });
    }

    /// Says this replica is alive every [`HEARTBEAT_INTERVAL`], learning how many are; the
    /// beat is also what turns shared budgets back on after Redis failed, probed every
    /// [`DEGRADED_PROBE_INTERVAL`] until then.
    async fn heartbeats(self: Arc<Self>) {
        let key = self.key("replicas");
        let ttl = u64::try_from(HEARTBEAT_TTL.as_millis()).unwrap_or(u64::MAX);
        loop {
            let mut commands = self.commands.clone();
            let mut beat = HEARTBEAT.key(&key);
            beat.arg(&self.origin).arg(ttl);
            match tokio::time::timeout(
                BUDGET_CHECK_TIMEOUT,
                beat.invoke_async::<u32>(&mut commands),
            )
            .await
            {
                Ok(Ok(replicas)) => self.state.heard(replicas),
                Ok(Err(err)) => self.state.degrade(&err.to_string()),
                Err(_) => self.state.degrade("no answer within 50 ms"),
            }
            tokio::time::sleep(if self.state.shared.load(Ordering::Relaxed) {
                HEARTBEAT_INTERVAL
            } else {
                DEGRADED_PROBE_INTERVAL
            })
            .await;
        }
    }

    /// One subscription, until it drops; every tag resolution is forgotten then.
    async fn subscribe(&self, tags: &TagInvalidator) -> Result<(), redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&[TAG_CHANNEL, POLL_CHANNEL]).await?;
        tracing::info!("Redis: sharing tag moves and poll results with the other replicas");
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if message.get_channel_name() == POLL_CHANNEL {
                if let Some((origin, repository, tag, state)) = decode_poll(&text)
                    && origin != self.origin
                    && let Some(hub) = self.hub.get().and_then(Weak::upgrade)
                {
                    hub.heard(&repository, &tag, state);
                }
            } else if let Some((origin, repository, moved)) = decode_move(&text)
                && origin != self.origin
            {
                match moved {
                    Moved::Tag(tag) => tags.forget(repository, tag),
                    Moved::Deleted(digest) => tags.forget_digest(repository, digest),
                }
            }
        }
        tags.forget_all();
        tracing::warn!("Redis: the subscription dropped; every tag resolution forgotten");
        Ok(())
    }

    /// Runs `script` on `operation`'s budget key with `args`, within
    /// [`BUDGET_CHECK_TIMEOUT`]; the error says why it did not answer.
    fn on_budget<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &'static redis::Script,
        operation: &str,
        args: Vec<u64>,
    ) -> impl Future<Output = Result<T, String>> + Send + 'static {
        let key = self.key(&format!("budget:{operation}"));
        let mut commands = self.commands.clone();
        async move {
            let mut call = script.key(&key);
            for arg in args {
                call.arg(arg);
            }
            match tokio::time::timeout(BUDGET_CHECK_TIMEOUT, call.invoke_async::<T>(&mut commands))
                .await
            {
                Ok(answer) => answer.map_err(|err| err.to_string()),
                Err(_) => Err("no answer within 50 ms".to_owned()),
            }
        }
    }

    /// Publishes `message` on `channel`, on a task of its own, within [`BUDGET_CHECK_TIMEOUT`].
    fn publish(&self, channel: &'static str, message: String) {
        let mut commands = self.commands.clone();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                BUDGET_CHECK_TIMEOUT,
                commands.publish::<_, _, ()>(channel, message),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!(channel, "Redis: a message was not published");
            }
        });
    }
}

impl Mode {
    /// Redis answered a heartbeat: `replicas` are alive, and budgets are shared (again). A
    /// count past [`MAX_PLAUSIBLE_REPLICAS`] is someone writing to Redis, not a fleet: it is
    /// not believed (the configured share stands in), or 20,000 fake members would pace each
    /// replica at quota ÷ 20,001 while Redis is out.
    fn heard(&self, replicas: u32) {
        let replicas = if replicas > MAX_PLAUSIBLE_REPLICAS {
            tracing::warn!(
                replicas,
                most = MAX_PLAUSIBLE_REPLICAS,
                "Redis counts implausibly many live replicas: the configured share stands in"
            );
            0
        } else {
            replicas
        };
        self.replicas.store(replicas, Ordering::Relaxed);
        *self.heard_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        if !self.shared.swap(true, Ordering::Relaxed) {
            metrics::budget_mode(true);
            tracing::info!(
                replicas,
                "Redis answers: ECR budgets are shared by the fleet, whole quotas"
            );
        }
    }

    /// Redis failed a check: budgets fall back to quota ÷ N until it answers a heartbeat.
    fn degrade(&self, why: &str) {
        if self.shared.swap(false, Ordering::Relaxed) {
            metrics::budget_mode(false);
            tracing::warn!(
                why,
                share = self.replicas(),
                "Redis failed: ECR budgets fall back to the quotas divided by `share` per replica"
            );
        }
    }

    /// N in quota ÷ N: the live replicas Redis last counted, while recent and plausible, else
    /// the configured share.
    fn replicas(&self) -> u32 {
        let heard = *self.heard_at.lock().unwrap_or_else(PoisonError::into_inner);
        let counted = self.replicas.load(Ordering::Relaxed);
        match heard {
            Some(at) if at.elapsed() < REPLICAS_FRESH_FOR && counted > 0 => counted,
            _ => self.rate_share,
        }
    }
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("scope", &self.scope)
            .field("shared", &self.state.shared.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The budgets of other registries: the same link, its keys under the registry's own hash tag
/// (`ecr-image-service:{<account>:<region>}:budget:<operation>`), so that each account and
/// region has its own shared quota, and one account's burst never takes another's slots.
impl BudgetScopes for Fleet {
    fn slots(&self, scope: &str) -> Arc<dyn SharedSlots> {
        Arc::new(Self {
            client: self.client.clone(),
            commands: self.commands.clone(),
            origin: self.origin.clone(),
            scope: scope.to_owned(),
            state: Arc::clone(&self.state),
            hub: OnceLock::new(),
        })
    }
}

impl SharedSlots for Fleet {
    fn is_shared(&self) -> bool {
        self.state.shared.load(Ordering::Relaxed)
    }

    fn take(
        &self,
        operation: &'static str,
        interval: Duration,
        wanted: u32,
        horizon: Duration,
    ) -> BoxFuture<'static, Slot> {
        let answer = self.on_budget::<(u32, u64)>(
            &TAKE_SLOTS,
            operation,
            vec![micros(interval), u64::from(wanted.max(1)), micros(horizon)],
        );
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            match answer.await {
                // An honest limiter without burst answers at most an interval, plus the second
                // a replica coming back owes: a timestamp far ahead is a broken or forged key,
                // and would refuse every call for as long ("retry after 9,999,999 s"). A grant
                // of more than was asked, or due past the horizon, is as broken.
                Ok((count, first_in))
                    if count > wanted.max(1)
                        || (count > 0 && Duration::from_micros(first_in) > horizon)
                        || Duration::from_micros(first_in) > interval + MAX_OWED_WAIT =>
                {
                    state.degrade("Redis answered an implausible budget slot");
                    Slot::Unavailable
                }
                Ok((0, wait)) => Slot::NotBefore(Duration::from_micros(wait)),
                Ok((count, first_in)) => Slot::Granted {
                    count,
                    first_in: Duration::from_micros(first_in),
                },
                Err(why) => {
                    state.degrade(&why);
                    Slot::Unavailable
                }
            }
        })
    }

    fn give_back(&self, operation: &'static str, interval: Duration) {
        let given = self.on_budget::<u8>(&GIVE_BACK, operation, vec![micros(interval)]);
        tokio::spawn(given);
    }

    fn owe(
        &self,
        operation: &'static str,
        interval: Duration,
        sends: usize,
    ) -> BoxFuture<'static, ()> {
        let sends = u64::try_from(sends).unwrap_or(u64::MAX);
        let owed = self.on_budget::<u8>(&OWE, operation, vec![sends, micros(interval)]);
        Box::pin(async move {
            let _ = owed.await;
        })
    }

    fn replicas(&self) -> u32 {
        self.state.replicas()
    }
}

impl TagBus for Fleet {
    /// Other replicas drop their resolution of the tag (what it points at now, they read).
    fn moved(&self, change: &TagMove<'_>) {
        let message = encode_move(&self.origin, change.repository, change.tag.as_str());
        self.publish(TAG_CHANNEL, message);
    }

    /// Other replicas drop the image from their caches. On the tag channel, as `@digest` where
    /// a move names its tag: no tag starts with `@`, so a replica of an older version ignores
    /// it rather than misreading it.
    fn digest_deleted(&self, repository: &RepositoryKey, digest: &Digest) {
        let message = encode_move(&self.origin, repository, &format!("@{digest}"));
        self.publish(TAG_CHANNEL, message);
    }
}

impl SharedPolls for Fleet {
    fn attach(&self, hub: Weak<WatchHub>) {
        let _ = self.hub.set(hub);
    }

    fn poll_turn(
        &self,
        repository: &RepositoryKey,
        tags: Vec<Tag>,
        interval: Duration,
    ) -> BoxFuture<'static, Option<Option<Vec<Tag>>>> {
        let name = repository_name(repository);
        let lease = self.key(&format!("poller:{name}"));
        let watched = self.key(&format!("watched:{name}"));
        // Two intervals (each ±10%): the holder renews before it lapses; a holder gone is
        // replaced within two.
        let ttl = u64::try_from(interval.as_millis().saturating_mul(2)).unwrap_or(u64::MAX);
        let origin = self.origin.clone();
        let mut commands = self.commands.clone();
        Box::pin(async move {
            let mut turn = POLL_TURN.key(&lease);
            turn.key(&watched)
                .arg(&origin)
                .arg(ttl)
                .arg(MAX_FLEET_TAGS_PER_REPOSITORY);
            for tag in &tags {
                turn.arg(tag.as_str());
            }
            let answer = tokio::time::timeout(
                BUDGET_CHECK_TIMEOUT,
                turn.invoke_async::<Vec<redis::Value>>(&mut commands),
            )
            .await
            .ok()?
            .ok()?;
            let mut answer = answer.into_iter();
            let holder = matches!(answer.next(), Some(redis::Value::Int(1)));
            Some(holder.then(|| {
                answer
                    .take(MAX_FLEET_TAGS_PER_REPOSITORY)
                    .filter_map(|value| redis::from_redis_value::<String>(value).ok())
                    .filter_map(|tag| Tag::parse(&tag).ok())
                    .collect()
            }))
        })
    }

    fn polled(&self, repository: &RepositoryKey, tag: &Tag, state: &TagState) {
        self.publish(
            POLL_CHANNEL,
            encode_poll(&self.origin, repository, tag, state),
        );
    }
}

/// `interval` in whole microseconds, the scripts' unit.
fn micros(interval: Duration) -> u64 {
    u64::try_from(interval.as_micros()).unwrap_or(u64::MAX)
}

/// `registry/repository`, or `repository` for the default registry.
fn repository_name(repository: &RepositoryKey) -> String {
    match &repository.registry_id {
        Some(registry) => format!("{}/{}", registry.key(), repository.repository),
        None => repository.repository.to_string(),
    }
}

/// `origin \n registry \n repository \n tag` (or `@digest`, an image deleted): validated
/// names hold no newline.
fn encode_move(origin: &str, repository: &RepositoryKey, what: &str) -> String {
    let registry = repository
        .registry_id
        .as_ref()
        .map_or_else(String::new, RegistryId::key);
    format!("{origin}\n{registry}\n{}\n{what}", repository.repository)
}

/// What a message on the tag channel says changed.
#[derive(Debug, PartialEq, Eq)]
enum Moved {
    /// A tag moved or was deleted.
    Tag(Tag),
    /// An image was deleted.
    Deleted(Digest),
}

fn decode_move(text: &str) -> Option<(&str, RepositoryKey, Moved)> {
    let mut parts = text.splitn(4, '\n');
    let origin = parts.next()?;
    let repository = decode_repository(parts.next()?, parts.next()?)?;
    let what = parts.next()?;
    let moved = match what.strip_prefix('@') {
        Some(digest) => Moved::Deleted(Digest::parse(digest).ok()?),
        None => Moved::Tag(Tag::parse(what).ok()?),
    };
    Some((origin, repository, moved))
}

fn decode_repository(registry: &str, repository: &str) -> Option<RepositoryKey> {
    Some(RepositoryKey {
        registry_id: match registry {
            "" => None,
            id => Some(RegistryId::from_key(id).ok()?),
        },
        repository: RepositoryName::parse(repository).ok()?,
    })
}

/// A move's fields, then digest (empty: the tag does not exist), observed, checked and stale
/// since (milliseconds since the epoch; empty: not stale), and the media type last, which the
/// registry chose and may hold anything.
fn encode_poll(origin: &str, repository: &RepositoryKey, tag: &Tag, state: &TagState) -> String {
    let millis = |at: SystemTime| {
        at.duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis())
    };
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        encode_move(origin, repository, tag.as_str()),
        state
            .digest
            .as_ref()
            .map(Digest::as_str)
            .unwrap_or_default(),
        millis(state.observed_at),
        millis(state.checked_at),
        state
            .stale_since
            .map(|at| millis(at).to_string())
            .unwrap_or_default(),
        state.media_type,
    )
}

fn decode_poll(text: &str) -> Option<(&str, RepositoryKey, Tag, TagState)> {
    if text.len() > MAX_POLL_MESSAGE_BYTES {
        return None;
    }
    let mut parts = text.splitn(9, '\n');
    let origin = parts.next()?;
    let repository = decode_repository(parts.next()?, parts.next()?)?;
    let tag = Tag::parse(parts.next()?).ok()?;
    let digest = match parts.next()? {
        "" => None,
        digest => Some(Digest::parse(digest).ok()?),
    };
    // A time past now (and a clock's skew) is no observation: years past 9999 broke the
    // watchers' timestamps.
    let latest = SystemTime::now() + MAX_CLOCK_SKEW;
    let at = |text: &str| -> Option<SystemTime> {
        let at = UNIX_EPOCH.checked_add(Duration::from_millis(text.parse().ok()?))?;
        (at <= latest).then_some(at)
    };
    let observed_at = at(parts.next()?)?;
    let checked_at = at(parts.next()?)?;
    let stale_since = match parts.next()? {
        "" => None,
        since => Some(at(since)?),
    };
    let media_type = parts.next()?;
    if media_type.len() > MAX_MEDIA_TYPE_BYTES {
        return None;
    }
    let media_type = media_type.to_owned();
    Some((
        origin,
        repository,
        tag,
        TagState {
            digest,
            media_type,
            observed_at,
            source: Source::Poll,
            checked_at,
            stale_since,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poll result crosses the channel whole, a media type with a newline included.
    #[test]
    fn poll_results_round_trip() {
        let repository = RepositoryKey {
            registry_id: Some(RegistryId::parse("123456789012").unwrap()),
            repository: RepositoryName::parse("team/app").unwrap(),
        };
        let tag = Tag::parse("live").unwrap();
        let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let state = TagState {
            digest: Some(Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap()),
            media_type: "odd\ntype".to_owned(),
            observed_at: at,
            source: Source::Poll,
            checked_at: at,
            stale_since: Some(at),
        };
        let text = encode_poll("me", &repository, &tag, &state);
        assert_eq!(
            decode_poll(&text),
            Some(("me", repository.clone(), tag.clone(), state.clone()))
        );
        let gone = TagState {
            digest: None,
            stale_since: None,
            ..state
        };
        let text = encode_poll("me", &repository, &tag, &gone);
        assert_eq!(decode_poll(&text).map(|d| d.3), Some(gone));
        assert_eq!(
            decode_move(&encode_move("me", &repository, tag.as_str())),
            Some(("me", repository.clone(), Moved::Tag(tag)))
        );
        let digest = Digest::of(b"{}");
        assert_eq!(
            decode_move(&encode_move("me", &repository, &format!("@{digest}"))),
            Some(("me", repository.clone(), Moved::Deleted(digest)))
        );
        assert_eq!(
            decode_move(&encode_move("me", &repository, "@not-a-digest")),
            None
        );
    }

    /// Issue 20, finding 11: a poll result is input from whoever can write to Redis. A 6 MB
    /// media type, times past the year 9999 or an hour ahead of this clock, and a message
    /// past 4 KiB are not poll results; an honest one still is.
    #[test]
    fn forged_poll_results_are_refused() {
        let repository = RepositoryKey {
            registry_id: None,
            repository: RepositoryName::parse("team/app").unwrap(),
        };
        let tag = Tag::parse("live").unwrap();
        let now = SystemTime::now();
        let honest = TagState {
            digest: Some(Digest::of(b"{}")),
            media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
            observed_at: now,
            source: Source::Poll,
            checked_at: now,
            stale_since: None,
        };
        assert!(decode_poll(&encode_poll("me", &repository, &tag, &honest)).is_some());
        let forged = [
            TagState {
                media_type: "x".repeat(6 << 20),
                ..honest.clone()
            },
            TagState {
                media_type: "x".repeat(256),
                ..honest.clone()
            },
            TagState {
                observed_at: now + Duration::from_secs(2 * 3600),
                ..honest.clone()
            },
            TagState {
                checked_at: UNIX_EPOCH + Duration::from_secs(253_402_300_800),
                ..honest.clone()
            },
            TagState {
                stale_since: Some(UNIX_EPOCH + Duration::from_secs(300_000_000_000)),
                ..honest.clone()
            },
        ];
        for state in forged {
            let text = encode_poll("me", &repository, &tag, &state);
            assert_eq!(decode_poll(&text), None, "{}", &text[..text.len().min(200)]);
        }
        let padded = format!(
            "{}{}",
            encode_poll("me", &repository, &tag, &honest),
            " ".repeat(5000)
        );
        assert_eq!(decode_poll(&padded), None);
    }
}
