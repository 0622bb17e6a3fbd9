//! beanstalkd over its text protocol. The protocol has no batches, so its users get throughput from many
//! connections, each one job at a time: a producer's batch is `n` sequential `put`s on its connection, a
//! consumer does `reserve-with-timeout` (the TTR is the lease) and `delete`. Use `--connections` to run many.
//!
//! The client is the few lines of protocol this needs over a tokio `TcpStream`: the beanstalkd crates on
//! crates.io are unmaintained or blocking.

use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::run::Peer;
use crate::stats::{Clock, E2e};

/// Time-to-run of each job: how long a reservation (lease) lasts.
const TTR_S: u32 = 60;

/// A tube on one beanstalkd server.
pub struct Beanstalkd {
    addr: String,
    tube: String,
}

/// One protocol connection.
pub struct Conn {
    r: BufReader<OwnedReadHalf>,
    w: BufWriter<OwnedWriteHalf>,
    line: String,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, String> {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("beanstalkd: connect {addr}: {e}"))?;
        // One small request per round trip: do not let Nagle hold it back.
        s.set_nodelay(true)
            .map_err(|e| format!("beanstalkd: nodelay: {e}"))?;
        let (r, w) = s.into_split();
        Ok(Conn {
            r: BufReader::new(r),
            w: BufWriter::new(w),
            line: String::new(),
        })
    }

    /// Sends `cmd` (+ an optional body) and reads the reply line into `self.line`.
    async fn call(&mut self, cmd: &str, body: Option<&[u8]>) -> Result<(), String> {
        let io = |e: std::io::Error| format!("beanstalkd: {e}");
        self.w.write_all(cmd.as_bytes()).await.map_err(io)?;
        self.w.write_all(b"\r\n").await.map_err(io)?;
        if let Some(b) = body {
            self.w.write_all(b).await.map_err(io)?;
            self.w.write_all(b"\r\n").await.map_err(io)?;
        }
        self.w.flush().await.map_err(io)?;
        self.line.clear();
        if self.r.read_line(&mut self.line).await.map_err(io)? == 0 {
            return Err("beanstalkd: connection closed".into());
        }
        Ok(())
    }

    fn expect(&self, prefix: &str, cmd: &str) -> Result<(), String> {
        if self.line.starts_with(prefix) {
            Ok(())
        } else {
            Err(format!("{cmd}: {}", self.line.trim_end()))
        }
    }
}

/// The job id and body size of a `RESERVED <id> <bytes>` line.
pub fn reserved(line: &str) -> Option<(u64, usize)> {
    let mut f = line.split_whitespace();
    if f.next()? != "RESERVED" {
        return None;
    }
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

impl Beanstalkd {
    /// Uses the tube `peers-<unique>` on the server at `addr` (`127.0.0.1:11300`); tubes need no creation.
    pub fn setup(addr: &str, unique: &str) -> Beanstalkd {
        Beanstalkd {
            addr: addr.to_string(),
            tube: format!("peers-{unique}"),
        }
    }
}

impl Peer for Beanstalkd {
    type Producer = Conn;
    type Consumer = Conn;

    async fn producer(&self, _: usize) -> Result<Conn, String> {
        let mut c = Conn::open(&self.addr).await?;
        c.call(&format!("use {}", self.tube), None).await?;
        c.expect("USING", "use")?;
        Ok(c)
    }

    async fn consumer(&self, _: usize) -> Result<Conn, String> {
        let mut c = Conn::open(&self.addr).await?;
        c.call(&format!("watch {}", self.tube), None).await?;
        c.expect("WATCHING", "watch")?;
        c.call("ignore default", None).await?;
        c.expect("WATCHING", "ignore")?;
        Ok(c)
    }

    async fn produce(&self, p: &mut Conn, n: usize, clock: &Clock) -> Result<(), String> {
        for _ in 0..n {
            // Each job is sent on its own, so each carries its own send time.
            let body = clock.payload_at(Instant::now());
            p.call(&format!("put 0 0 {TTR_S} {}", body.len()), Some(&body))
                .await?;
            p.expect("INSERTED", "put")?;
        }
        Ok(())
    }

    async fn consume(&self, c: &mut Conn, _max: usize, e2e: &mut E2e) -> Result<usize, String> {
        c.call("reserve-with-timeout 1", None).await?;
        if c.line.starts_with("TIMED_OUT") || c.line.starts_with("DEADLINE_SOON") {
            return Ok(0);
        }
        let (id, len) = reserved(&c.line).ok_or_else(|| format!("reserve: {}", c.line.trim_end()))?;
        let mut body = vec![0u8; len + 2];
        c.r.read_exact(&mut body)
            .await
            .map_err(|e| format!("beanstalkd: {e}"))?;
        e2e.item(Instant::now(), &body[..len]);
        c.call(&format!("delete {id}"), None).await?;
        c.expect("DELETED", "delete")?;
        Ok(1)
    }

    async fn teardown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_lines_parse() {
        assert_eq!(reserved("RESERVED 12 100\r\n"), Some((12, 100)));
        assert_eq!(reserved("TIMED_OUT\r\n"), None);
        assert_eq!(reserved("RESERVED x 1\r\n"), None);
    }
}
