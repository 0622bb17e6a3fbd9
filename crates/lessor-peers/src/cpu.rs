//! CPU accounting from `/proc`, so every result says who used the CPU during the run: the peer's server (a
//! process and its descendants, e.g. PostgreSQL's backends), this driver, and the whole machine. That is the
//! evidence that a figure is bounded by the server rather than by the driver: a server at 100 % of a core
//! (single-threaded Redis and beanstalkd) or a machine with no idle CPU left.
//!
//! Times in `/proc` are in clock ticks of `USER_HZ`, which the kernel fixes at 100 per second for user space
//! on every architecture Linux ships; reading it through `sysconf` would need `unsafe` (forbidden here) for a
//! constant.

use std::time::Instant;

/// Clock ticks per second of the times in `/proc/<pid>/stat` and `/proc/stat`.
const TICKS_PER_S: f64 = 100.0;

/// utime + stime (and, with `with_children`, the reaped children's cutime + cstime) from the text of a
/// `/proc/<pid>/stat` file, plus the parent pid. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str, with_children: bool) -> Option<(u64, u32)> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let mut ticks = num(14)? + num(15)?;
    if with_children {
        ticks += num(16)? + num(17)?;
    }
    let ppid = u32::try_from(num(4)?).ok()?;
    Some((ticks, ppid))
}

/// CPU ticks used so far by `root` and every live descendant (plus the children `root` has already reaped,
/// so short-lived workers such as PostgreSQL's autovacuum are not lost). `None` if `root` is gone.
pub fn tree_ticks(root: u32) -> Option<u64> {
    let own = std::fs::read_to_string(format!("/proc/{root}/stat")).ok()?;
    let (mut total, _) = parse_stat(&own, true)?;
    // One pass over /proc gives every process's parent; then walk down from root.
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == root {
                continue;
            }
            if let Some((ticks, ppid)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|t| parse_stat(&t, false))
            {
                procs.push((pid, ppid, ticks));
            }
        }
    }
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, ticks) in &procs {
            if ppid == parent {
                total += ticks;
                frontier.push(pid);
            }
        }
    }
    Some(total)
}

/// Ticks used by this process (all threads).
fn own_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&text, false).map(|(t, _)| t)
}

/// (busy, iowait, total) ticks of all CPUs from the text of `/proc/stat`.
pub fn parse_machine(text: &str) -> Option<(u64, u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are already inside user and nice).
    let total: u64 = v.iter().take(8).sum();
    let idle = *v.get(3)?;
    let iowait = *v.get(4)?;
    Some((total - idle - iowait, iowait, total))
}

fn machine_ticks() -> Option<(u64, u64, u64)> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// A snapshot of the counters at one instant.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    server: Option<u64>,
    driver: Option<u64>,
    machine: Option<(u64, u64, u64)>,
}

/// CPU use over a window, in % of one core (server, driver) or % of the whole machine (busy, iowait, other).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// The server process and its descendants, % of one core (200 = two cores busy).
    pub server_pct: Option<f64>,
    /// This driver, % of one core.
    pub driver_pct: Option<f64>,
    /// All CPUs busy (not idle, not waiting for I/O), % of the machine.
    pub machine_busy_pct: Option<f64>,
    /// Time CPUs sat idle waiting for I/O (fsync), % of the machine.
    pub machine_iowait_pct: Option<f64>,
    /// Busy time of every other process, % of the machine (disturbance from other work).
    pub other_pct: Option<f64>,
    /// CPUs of the machine.
    pub cores: usize,
}

impl Sample {
    /// Reads the counters now; `server` is the root pid of the server's process tree, if known.
    pub fn now(server: Option<u32>) -> Sample {
        Sample {
            at: Instant::now(),
            server: server.and_then(tree_ticks),
            driver: own_ticks(),
            machine: machine_ticks(),
        }
    }

    /// What was used between `self` and `later`.
    pub fn usage_until(&self, later: &Sample) -> Usage {
        let wall = later
            .at
            .saturating_duration_since(self.at)
            .as_secs_f64()
            .max(1e-9);
        let pct =
            |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / TICKS_PER_S / wall * 100.0);
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let server_pct = pct(self.server, later.server);
        let driver_pct = pct(self.driver, later.driver);
        let (mut busy, mut iowait) = (None, None);
        if let (Some(a), Some(b)) = (self.machine, later.machine) {
            let total = b.2.saturating_sub(a.2).max(1) as f64;
            busy = Some(b.0.saturating_sub(a.0) as f64 / total * 100.0);
            iowait = Some(b.1.saturating_sub(a.1) as f64 / total * 100.0);
        }
        let other_pct = busy.map(|b| {
            let ours = server_pct.unwrap_or(0.0) + driver_pct.unwrap_or(0.0);
            (b - ours / cores as f64).max(0.0)
        });
        Usage {
            server_pct,
            driver_pct,
            machine_busy_pct: busy,
            machine_iowait_pct: iowait,
            other_pct,
            cores,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_past_odd_command_names() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
        let line = "42 (nats server (x)) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 9 0 1 2 3";
        assert_eq!(parse_stat(line, false), Some((300, 7)));
        assert_eq!(parse_stat(line, true), Some((350, 7)));
        assert_eq!(parse_stat("garbage", false), None);
    }

    #[test]
    fn machine_line_splits_busy_iowait_and_total() {
        let text = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(parse_machine(text), Some((160, 40, 1000)));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = std::process::id();
        let a = Sample::now(Some(me));
        let b = Sample::now(Some(me));
        let u = a.usage_until(&b);
        assert!(u.server_pct.is_some() && u.driver_pct.is_some(), "{u:?}");
        assert!(u.cores >= 1);
    }
}
