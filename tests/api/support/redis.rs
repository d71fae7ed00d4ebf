//! A real Redis for one test: Debian's redis-server (installed by `scripts/test-deps.sh
//! redis`), on a free loopback port, persistence off, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running redis-server.
pub struct Redis {
    child: Child,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
}

impl Redis {
    /// Starts one and waits (polling PING, with a deadline) until it answers.
    pub fn start() -> Self {
        let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-deps.sh"))
            .arg("redis")
            .status()
            .expect("run scripts/test-deps.sh redis");
        assert!(status.success(), "scripts/test-deps.sh redis: {status}");
        // A port the OS just handed out is very likely still free a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let redis = Self {
            child: spawn(port),
            url: format!("redis://127.0.0.1:{port}"),
            port,
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
        self.child = spawn(self.port);
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

/// redis-server on loopback `port`, persistence off.
fn spawn(port: u16) -> Child {
    Command::new("/usr/bin/redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
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
