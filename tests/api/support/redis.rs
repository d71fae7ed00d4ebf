//! A real Redis for one test: Debian's redis-server (installed by `scripts/test-deps.sh
//! redis`), on a free loopback port, persistence off, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server.
pub struct Redis {
    child: Child,
    /// `redis://127.0.0.1:PORT` (`rediss://localhost:PORT` with TLS).
    pub url: String,
    port: u16,
    /// Arguments beyond the port and persistence.
    extra: Vec<String>,
}

impl Redis {
    /// Starts one and waits (polling PING, with a deadline) until it answers.
    pub fn start() -> Self {
        Self::start_with(|_| Vec::new(), |port| format!("redis://127.0.0.1:{port}"))
    }

    /// One that also serves TLS with `cert` and `key` (PEM files), on a second port the URL
    /// (`rediss://localhost:PORT`) names; PING is still polled in plain text.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let tls_port = free_port();
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        Self::start_with(
            move |_| {
                vec![
                    "--tls-port".into(),
                    tls_port.to_string(),
                    "--tls-cert-file".into(),
                    cert.clone(),
                    "--tls-key-file".into(),
                    key.clone(),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            },
            move |_| format!("rediss://localhost:{tls_port}"),
        )
    }

    /// One that also listens on the unix socket `socket`, which the URL (`unix://PATH`) names.
    pub fn start_unix(socket: &std::path::Path) -> Self {
        let path = socket.display().to_string();
        let url = format!("unix://{path}");
        Self::start_with(
            move |_| vec!["--unixsocket".into(), path.clone()],
            move |_| url.clone(),
        )
    }

    /// A one-node Redis Cluster holding every slot, its node file in `dir`: a plain client
    /// works against it, and Cluster's rules (CROSSSLOT) apply.
    pub fn start_cluster(dir: &std::path::Path) -> Self {
        let dir = dir.to_owned();
        let redis = Self::start_with(
            move |port| {
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    dir.join(format!("nodes-{port}.conf")).display().to_string(),
                ]
            },
            |port| format!("redis://127.0.0.1:{port}"),
        );
        redis.command("CLUSTER ADDSLOTSRANGE 0 16383", "+OK");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.command("CLUSTER INFO", "cluster_state:ok") {
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::park_timeout(Duration::from_millis(20));
        }
        redis
    }

    /// Sends the inline `command`; whether the reply holds `expected`.
    fn command(&self, command: &str, expected: &str) -> bool {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 4096];
        tcp.write_all(format!("{command}\r\n").as_bytes()).is_ok()
            && tcp
                .read(&mut reply)
                .is_ok_and(|n| String::from_utf8_lossy(&reply[..n]).contains(expected))
    }

    fn start_with(extra: impl Fn(u16) -> Vec<String>, url: impl Fn(u16) -> String) -> Self {
        let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-deps.sh"))
            .arg("redis")
            .status()
            .expect("run scripts/test-deps.sh redis");
        assert!(status.success(), "scripts/test-deps.sh redis: {status}");
        let port = free_port();
        let extra = extra(port);
        let redis = Self {
            child: spawn(port, &extra),
            url: url(port),
            port,
            extra,
        };
        redis.until_it_answers();
        redis
    }

    fn until_it_answers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }

    /// Stops it (`kill -STOP`): it hangs, connections stay open and nothing answers.
    pub fn stop(&self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid, which is not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    }

    /// Starts a fresh one (empty) on the same port, after [`kill`](Self::kill).
    pub fn restart(&mut self) {
        self.child = spawn(self.port, &self.extra);
        self.until_it_answers();
    }

    /// Whether it answers PING now.
    pub fn answers(&self) -> bool {
        let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
        let mut reply = [0u8; 7];
        tcp.write_all(b"PING\r\n").is_ok()
            && tcp.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Kills it (`kill -9`): it is gone, connections drop.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port the OS just handed out: very likely still free a moment later.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// redis-server on loopback `port`, persistence off.
fn spawn(port: u16, extra: &[String]) -> Child {
    Command::new("/usr/bin/redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server")
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
