//! `cargo bench --bench pacer`: what a rate budget delivers with requests queued, on the real
//! clock, at 500/s, 1,000/s and the default BatchGetImage budget (2,000/s): paced locally, and
//! taken from a shared limiter in Redis that answers 4 ms away (a delaying TCP proxy in front
//! of Debian's redis-server on loopback, 2 ms each way).
//!
//! A budget paces at 90% of its configured rate (the headroom for jitter between the budget
//! and ECR), so 90% of the configured rate is all a budget can deliver; both ratios are
//! printed. Each run keeps 16,000 requests of one caller queued and counts the slots released
//! in the 5 s after the first second. The bench reports, it does not fail.

#[allow(dead_code)]
#[path = "../tests/api/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ecr_image_service::call::{CallContext, Principal};
use ecr_image_service::fleet::Fleet;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::ecr::budget::{RateBudget, RateBudgets, SharedSlots};
use ecr_image_service::registry::local::LocalRegistry;
use support::backend::ScratchDir;
use support::redis::Redis;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Configured rates measured.
const RATES: [f64; 3] = [500.0, 1000.0, 2000.0];
/// The budget's pacing headroom (`budget.rs`): it paces at this fraction of the rate.
const PACED: f64 = 0.9;
/// One way of the added round trip to Redis.
const ONE_WAY: Duration = Duration::from_millis(2);
const QUEUED: usize = 16_000;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURED: Duration = Duration::from_secs(5);

fn main() {
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("NO_PROXY", "127.0.0.1,localhost") };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    println!(
        "pacer: {QUEUED} requests of one caller queued, slots counted over {MEASURED:?} after \
         {WARM_UP:?}"
    );
    println!("| configured rate | where | delivered/s | of configured | of paced (90%) |");
    println!("|---:|---|---:|---:|---:|");
    for rate in RATES {
        let budget = RateBudget::per_second(rate);
        report(rate, "local", measure(&budget).await);
    }
    let redis = Redis::start();
    let dir = ScratchDir::new("pacer");
    let proxy = delay_proxy(redis.url.trim_start_matches("redis://"), ONE_WAY).await;
    for rate in RATES {
        // A fresh scope per rate: the limiter's key starts empty.
        let fleet = Fleet::new(&proxy, &format!("pacer:{rate}"), 1).unwrap();
        let local = LocalRegistry::open(&support::backend::local_settings(&dir.0)).unwrap();
        let cache = CachedRegistry::new(Arc::new(local), CacheSettings::default());
        fleet.listen(cache.tag_invalidator());
        let shared: Arc<dyn SharedSlots> = fleet;
        let waited = Instant::now();
        while !shared.is_shared() {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "Redis never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let budgets = RateBudgets::shared([("BatchGetImage", rate)], 1, Some(shared));
        let budget = budgets.get("BatchGetImage").unwrap();
        report(rate, "Redis, 4 ms away", measure(budget).await);
    }
    drop(redis);
}

fn report(rate: f64, place: &str, delivered: f64) {
    println!(
        "| {rate:.0}/s | {place} | {delivered:.0} | {:.1}% | {:.1}% |",
        100.0 * delivered / rate,
        100.0 * delivered / (rate * PACED)
    );
}

/// Slots released per second with [`QUEUED`] requests waiting on `budget`.
async fn measure(budget: &RateBudget) -> f64 {
    let budget = Arc::new(budget.clone());
    let released = Arc::new(AtomicUsize::new(0));
    let caller = CallContext::new(
        Instant::now() + Duration::from_secs(3600),
        Ok(Principal::named("busy")),
    );
    let requests: Vec<_> = (0..QUEUED)
        .map(|_| {
            let (budget, released) = (Arc::clone(&budget), Arc::clone(&released));
            tokio::spawn(caller.clone().scope(async move {
                if budget.acquire(None).await.is_ok() {
                    released.fetch_add(1, Ordering::Relaxed);
                }
            }))
        })
        .collect();
    tokio::time::sleep(WARM_UP).await;
    let before = released.load(Ordering::Relaxed);
    tokio::time::sleep(MEASURED).await;
    let during = released.load(Ordering::Relaxed) - before;
    for request in requests {
        request.abort();
    }
    #[allow(clippy::cast_precision_loss)]
    let per_second = during as f64 / MEASURED.as_secs_f64();
    per_second
}

/// A TCP proxy to `upstream` that holds every chunk `one_way` in each direction; its
/// `redis://` URL.
async fn delay_proxy(upstream: &str, one_way: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let upstream = upstream.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(delayed(client_read, server_write, one_way));
            tokio::spawn(delayed(server_read, client_write, one_way));
        }
    });
    format!("redis://{address}")
}

/// Copies `from` to `to`, each chunk delivered `delay` after it was read, in order.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::AsyncReadExt;
    let (chunks, mut pending) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if chunks
                        .send((Instant::now() + delay, buffer[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    while let Some((due, chunk)) = pending.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
}
