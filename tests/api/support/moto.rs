//! The moto ECR emulator: installed pinned by `scripts/test-deps.sh`, started once per test
//! binary on a free loopback port, and killed by the kernel when the test binary exits.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A cold moto start imports a few hundred Python modules; on a loaded 2-core CI box that can
/// take tens of seconds, so the bound is generous. Readiness is polled, never slept for.
const STARTUP_DEADLINE: Duration = Duration::from_secs(120);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

static ENDPOINT: OnceLock<Result<String, String>> = OnceLock::new();

/// The emulator's endpoint URL, starting it on first use.
pub fn endpoint() -> &'static str {
    match ENDPOINT.get_or_init(start) {
        Ok(endpoint) => endpoint,
        Err(problem) => panic!("cannot start the moto emulator: {problem}"),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `moto_server` from `$MOTO_SERVER`, else from the venv `scripts/test-deps.sh` installs.
fn moto_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("MOTO_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let status = Command::new(root().join("scripts/test-deps.sh"))
        .status()
        .map_err(|e| format!("cannot run scripts/test-deps.sh: {e}"))?;
    if !status.success() {
        return Err(format!("scripts/test-deps.sh failed: {status}"));
    }
    let venv = std::env::var_os("ECR_TEST_VENV")
        .map_or_else(|| root().join("target/test-venv"), PathBuf::from);
    Ok(venv.join("bin/moto_server"))
}

fn start() -> Result<String, String> {
    let server = moto_server()?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let log_path = std::env::temp_dir().join(format!("moto-{port}.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    // PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so the child is
    // spawned from a thread that lives as long as the test binary and then parks forever.
    std::thread::Builder::new()
        .name("moto".into())
        .spawn(move || {
            let mut command = Command::new(&server);
            command
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let spawned = command
                .spawn()
                .map(|_child| ())
                .map_err(|e| format!("cannot start {}: {e}", server.display()));
            let _ = tx.send(spawned);
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv().map_err(|e| e.to_string())??;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STARTUP_DEADLINE;
    while TcpStream::connect(address).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "not listening on {address} after {STARTUP_DEADLINE:?}; see {}",
                log_path.display()
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    Ok(format!("http://{address}"))
}
