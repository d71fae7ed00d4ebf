//! nginx from Debian's packages (installed pinned by `scripts/test-deps.sh`) as an HTTP/2
//! `grpc_pass` proxy on loopback: the stand-in for a service-mesh sidecar in front of the service.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cold nginx starts in milliseconds; the bound only guards a wedged CI machine.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A running nginx proxying gRPC to one upstream; stopped when dropped.
pub struct Nginx {
    child: Child,
    address: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx on a free loopback port, proxying every request to `upstream` with
    /// `grpc_pass` (HTTP/2 to both sides, as a sidecar does), and waits until it accepts.
    pub fn start(upstream: SocketAddr) -> Nginx {
        let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-deps.sh"))
            .arg("nginx")
            .status()
            .expect("run scripts/test-deps.sh nginx");
        assert!(status.success(), "scripts/test-deps.sh nginx: {status}");
        // nginx cannot report the port it bound, so take a free one and hand it over.
        let address = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let dir =
            std::env::temp_dir().join(format!("nginx-{}-{}", std::process::id(), address.port()));
        std::fs::create_dir_all(&dir).expect("nginx directory");
        let d = dir.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             server {{\n    listen {address} http2;\n    \
             location / {{ grpc_pass grpc://{upstream}; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), config).expect("nginx.conf");
        let child = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            child,
            address,
            dir,
        };
        let deadline = Instant::now() + STARTUP_DEADLINE;
        while TcpStream::connect(address).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited with {status}: {}", nginx.error_log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening: {}",
                nginx.error_log()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        nginx
    }

    /// The proxy's URL, for a gRPC client.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// What nginx logged, for a failure message.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Requests nginx proxied (its access log), to show a call really went through it.
    pub fn requests_logged(&self) -> usize {
        std::fs::read_to_string(self.dir.join("access.log"))
            .map(|log| log.lines().count())
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
