//! The real `lessor` binary as a child process, for tests that kill it (SIGKILL) or run several side by side.
//!
//! [`ServerCommand`] describes the process (the binary, its arguments, where its log goes); [`ServerCommand::start`]
//! finds a free port, passes it with `--address`, and waits until that very process answers `/health` with
//! `pass`. The free port is found by binding port 0 and releasing it, so another process may take it before the
//! server binds it: then the server exits with "cannot listen" and is started again on another port. Health only
//! counts once the child itself listens on the port (read from `/proc`), so a stranger on the port cannot answer
//! for it. [`ServerProcess`] kills and reaps the child on drop, so a failing test leaves nothing behind.
//!
//! The binary's path is known only to the binary's own crate: pass `env!("CARGO_BIN_EXE_lessor")`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lessor_client::Client;

/// How a `lessor server` child is started.
#[derive(Clone, Debug)]
pub struct ServerCommand {
    binary: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    startup_limit: Duration,
    tls: Option<lessor_client::TlsConfig>,
    /// Environment changes: set to a value, or removed (`None`).
    env: Vec<(OsString, Option<OsString>)>,
}

impl ServerCommand {
    /// `binary server`, its stdout and stderr written to `log` (replaced on each start).
    pub fn new(binary: impl Into<PathBuf>, log: impl Into<PathBuf>) -> ServerCommand {
        ServerCommand {
            binary: binary.into(),
            args: Vec::new(),
            log: log.into(),
            startup_limit: Duration::from_secs(10),
            tls: None,
            env: Vec::new(),
        }
    }

    /// The server serves HTTPS (its configuration has a `tls` section): talk to it over `https://` with `tls`
    /// (the CA that signed its certificate, and a client certificate when it asks for one).
    pub fn https(mut self, tls: lessor_client::TlsConfig) -> ServerCommand {
        self.tls = Some(tls);
        self
    }

    /// Adds an argument after `server` (the address is added by [`ServerCommand::start`]).
    pub fn arg(mut self, arg: impl Into<OsString>) -> ServerCommand {
        self.args.push(arg.into());
        self
    }

    /// Sets an environment variable of the child.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> ServerCommand {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable the child would inherit.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> ServerCommand {
        self.env.push((key.into(), None));
        self
    }

    /// `--config <path>`.
    pub fn config(self, path: &Path) -> ServerCommand {
        self.arg("--config").arg(path)
    }

    /// `--data-dir <path>`.
    pub fn data_dir(self, path: &Path) -> ServerCommand {
        self.arg("--data-dir").arg(path)
    }

    /// How long the server may take to become healthy (10 s unless set).
    pub fn startup_limit(mut self, limit: Duration) -> ServerCommand {
        self.startup_limit = limit;
        self
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts the server on a free port and waits until it is healthy.
    ///
    /// # Panics
    /// When the server exits during start-up (other than losing its port), is not healthy within the start-up
    /// limit, or cannot get a free port in 5 attempts; the message carries the end of its log.
    pub async fn start(&self) -> ServerProcess {
        for _ in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
                l.local_addr().expect("local addr").port()
            };
            let mut server = self.spawn(port);
            match server.wait_healthy(self.startup_limit).await {
                Some(took) => {
                    server.startup = took;
                    return server;
                }
                None => println!("port {port} was taken before the server bound it; starting again"),
            }
        }
        panic!("could not start the server on a free port in 5 attempts");
    }

    fn spawn(&self, port: u16) -> ServerProcess {
        let address = format!("127.0.0.1:{port}");
        let out = std::fs::File::create(&self.log).expect("create the server log");
        let err = out.try_clone().expect("clone the server log handle");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("server")
            .args(&self.args)
            .arg("--address")
            .arg(&address)
            .env_remove("LESSOR_CONFIG")
            .env_remove("RUST_LOG");
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} server: {e}", self.binary.display()));
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://{address}");
        let mut client = Client::new(&endpoint).expect("a client for the server");
        if let Some(tls) = &self.tls {
            client = client.with_tls(tls).expect("a TLS client for the server");
        }
        ServerProcess {
            child,
            client,
            endpoint,
            port,
            log: self.log.clone(),
            startup: Duration::ZERO,
        }
    }
}

/// A running `lessor server` child; killed (SIGKILL) and reaped on drop.
pub struct ServerProcess {
    child: Child,
    client: Client,
    endpoint: String,
    port: u16,
    log: PathBuf,
    startup: Duration,
}

impl ServerProcess {
    /// A client for this server.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `http://127.0.0.1:<port>` (`https://` with [`ServerCommand::https`]).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long start-up took, until `/health` passed.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// The last 40 lines of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// SIGKILL (what `Child::kill` sends on unix) and reap: no graceful shutdown, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until this process listens on its port and `/health` passes; returns how long that took, or `None`
    /// when the port was taken. Panics if the process exits otherwise or the limit passes.
    async fn wait_healthy(&mut self, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        let mut last = String::from("not listening yet");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = self.log_tail();
                if log.contains("cannot listen on") {
                    return None;
                }
                panic!("the server exited during start-up ({status}); log:\n{log}");
            }
            if listens(self.child.id(), self.port) {
                last = match tokio::time::timeout(Duration::from_secs(2), self.client.health()).await {
                    Ok(Ok(doc)) if doc.get("status").and_then(|s| s.as_str()) == Some("pass") => {
                        return Some(t0.elapsed());
                    }
                    Ok(Ok(doc)) => doc.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer within 2 s".into(),
                };
            }
            assert!(
                t0.elapsed() < limit,
                "the server did not become healthy within {limit:?}; last /health answer: {last}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last 40 lines of the file at `path` (empty when it cannot be read).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Whether process `pid` has a socket listening on 127.0.0.1:`port` (IPv4, from `/proc/net/tcp` and the
/// process's file descriptors).
pub fn listens(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let suffix = format!(":{port:04X}");
    let inodes: HashSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address is field 1, the state field 3 (0A = LISTEN), the inode field 9.
            (f.len() > 9 && f[1].ends_with(&suffix) && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|target| inodes.contains(target.to_string_lossy().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_sees_this_process_and_not_a_free_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(listens(std::process::id(), port));
        drop(l);
        assert!(!listens(std::process::id(), port));
    }

    #[test]
    fn log_tail_keeps_the_last_40_lines() {
        let dir = std::env::temp_dir().join(format!("lessor-testkit-tail-{}", std::process::id()));
        let lines: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
        std::fs::write(&dir, lines.join("\n")).expect("write");
        let tail = log_tail(&dir);
        let _ = std::fs::remove_file(&dir);
        assert_eq!(tail.lines().count(), 40);
        assert!(
            tail.starts_with("line 10\n") && tail.ends_with("line 49"),
            "{tail}"
        );
    }
}
