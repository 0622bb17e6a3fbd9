//! `lessor rebalance`: online partition moves and resizing (`queues.rebalance`), and `rebalance
//! list|get|cancel` (`--cancel ID` is the same as `cancel ID`).
//!
//! Starting a task waits for it by default, with the progress bar the backup commands use (items moved out of
//! the items to move, rate, ETA) and a summary line; `--detach` prints the task and returns at once; `--json`
//! prints the task as it ends (or as started, with `--detach`).

use std::time::Duration;

use clap::{Args, Subcommand};
use lessor_client::Client;
use lessor_proto as pb;

use super::auth::{table, when};
use super::backup::progress;
use super::{api, print};

/// How often a waiting command polls the task.
const WAIT_POLL: Duration = Duration::from_millis(250);

/// `lessor rebalance ...`: start a rebalance of a queue, or look at the tasks.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RebalanceArgs {
    #[command(subcommand)]
    cmd: Option<RebalanceCmd>,
    #[command(flatten)]
    start: RebalanceStart,
}

/// `lessor rebalance QUEUE` flags: exactly one of `--move`, `--spread`, `--partitions`.
#[derive(Args, Debug)]
pub struct RebalanceStart {
    /// The queue.
    queue: Option<String>,
    /// Move a partition to another partition store: `PARTITION=STORE` (repeatable; moved one after the other).
    #[arg(long = "move", value_name = "PARTITION=STORE")]
    moves: Vec<String>,
    /// Move partitions so that each store holds its share by the current affinities (e.g. after setting a
    /// store's affinity to 0 to retire it).
    #[arg(long)]
    spread: bool,
    /// New partition count: more grows the queue at once; fewer drains the highest-numbered partitions into the
    /// others.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    partitions: i32,
    /// Most items moved per second (default: no limit), to leave the machine to the serving path.
    #[arg(
        long = "max-rate",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    max_rate: i64,
    /// Print the task as started and return, without waiting for it.
    #[arg(long)]
    detach: bool,
    /// Cancel the running task ID instead of starting one (the same as `lessor rebalance cancel ID`; give the
    /// queue too unless you hold permissions in `_system`).
    #[arg(long, value_name = "ID", conflicts_with_all = ["moves", "spread", "partitions", "max_rate", "detach"])]
    cancel: Option<String>,
}

/// `lessor rebalance list|get`.
#[derive(Subcommand, Debug)]
pub enum RebalanceCmd {
    /// List rebalance tasks, newest first.
    List {
        /// Only the tasks of this queue (without it, every task: needs permissions in `_system`).
        queue: Option<String>,
    },
    /// Show one rebalance task.
    Get {
        /// Task id (`rb-...`).
        task_id: String,
        /// The task's queue (without it, the request needs permissions in `_system`).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Cancel a running rebalance task: moves done stay done, a move under way is finished if any of its items
    /// reached the new store (dropped if none did), a shrink stops where it is; nothing is lost or doubled.
    Cancel {
        /// Task id (`rb-...`).
        task_id: String,
        /// The task's queue (without it, the request needs permissions in `_system`).
        #[arg(long)]
        queue: Option<String>,
    },
}

fn parse_move(s: &str) -> Result<pb::PartitionMove, String> {
    let (p, store) = s
        .split_once('=')
        .ok_or_else(|| format!("--move '{s}': expected PARTITION=STORE, e.g. 3=fjall-02"))?;
    let partition = p
        .trim()
        .parse::<i32>()
        .map_err(|_| format!("--move '{s}': '{p}' is not a partition number"))?;
    Ok(pb::PartitionMove {
        partition,
        to_store: store.trim().to_string(),
    })
}

fn task_line(t: &pb::RebalanceTask) -> String {
    let mut s = format!(
        "task {}  {}  {}  moved={}  remaining={}",
        t.task_id, t.queue_name, t.status, t.moved, t.remaining
    );
    if !t.error.is_empty() {
        s.push_str(&format!("  error: {}", t.error));
    }
    s
}

fn what(t: &pb::RebalanceTask) -> String {
    if t.partitions > 0 {
        return format!("partitions -> {}", t.partitions);
    }
    if t.moves.is_empty() {
        return "(nothing to move)".into();
    }
    t.moves
        .iter()
        .map(|m| format!("{}->{}", m.partition, m.to_store))
        .collect::<Vec<_>>()
        .join(",")
}

fn task_table(tasks: &[pb::RebalanceTask]) -> String {
    let rows = tasks
        .iter()
        .map(|t| {
            vec![
                t.task_id.clone(),
                t.queue_name.clone(),
                what(t),
                t.status.clone(),
                t.moved.to_string(),
                t.remaining.to_string(),
                when(&t.created_at),
                t.error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "TASK",
            "QUEUE",
            "WHAT",
            "STATUS",
            "MOVED",
            "REMAINING",
            "CREATED",
            "ERROR",
        ],
        rows,
    )
}

/// `lessor rebalance`.
pub async fn rebalance(c: &Client, json: bool, a: RebalanceArgs) -> Result<(), String> {
    match a.cmd {
        Some(RebalanceCmd::List { queue }) => {
            let r = c
                .rebalance_list(&pb::RebalanceListRequest {
                    queue_name: queue.unwrap_or_default(),
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| task_table(&r.items));
            Ok(())
        }
        Some(RebalanceCmd::Get { task_id, queue }) => {
            let r = c
                .rebalance_get(&pb::RebalanceTaskRequest {
                    task_id,
                    queue_name: queue.unwrap_or_default(),
                })
                .await
                .map_err(api)?;
            print(json, &r, |t| task_table(std::slice::from_ref(t)));
            Ok(())
        }
        Some(RebalanceCmd::Cancel { task_id, queue }) => cancel(c, json, task_id, queue).await,
        None => match a.start.cancel.clone() {
            Some(task_id) => cancel(c, json, task_id, a.start.queue).await,
            None => start(c, json, a.start).await,
        },
    }
}

async fn cancel(c: &Client, json: bool, task_id: String, queue: Option<String>) -> Result<(), String> {
    let r = c
        .rebalance_cancel(&pb::RebalanceTaskRequest {
            task_id,
            queue_name: queue.unwrap_or_default(),
        })
        .await
        .map_err(api)?;
    print(json, &r, task_line);
    Ok(())
}

async fn start(c: &Client, json: bool, s: RebalanceStart) -> Result<(), String> {
    let Some(queue) = s.queue else {
        return Err(
            "rebalance: name the queue (lessor rebalance QUEUE --move P=STORE | --spread | --partitions N), or \
             use list or get"
                .into(),
        );
    };
    let moves = s
        .moves
        .iter()
        .map(|m| parse_move(m))
        .collect::<Result<Vec<_>, _>>()?;
    let task = c
        .queues_rebalance(&pb::QueueRebalanceRequest {
            queue_name: queue.clone(),
            moves,
            spread: s.spread,
            partitions: s.partitions,
            max_items_per_sec: s.max_rate,
        })
        .await
        .map_err(api)?;
    if s.detach || task.status != "running" {
        print(json, &task, task_line);
        return Ok(());
    }
    let total = u64::try_from(task.moved + task.remaining).ok().filter(|&n| n > 0);
    let bar = progress(json, total, "rebalance");
    let req = pb::RebalanceTaskRequest {
        task_id: task.task_id.clone(),
        queue_name: queue,
    };
    let started = std::time::Instant::now();
    let mut last = task;
    while last.status == "running" || last.status == "cancelling" {
        tokio::time::sleep(WAIT_POLL).await;
        last = c.rebalance_get(&req).await.map_err(api)?;
        let moved = u64::try_from(last.moved).unwrap_or(0);
        let left = u64::try_from(last.remaining).unwrap_or(0);
        // Items that come back to a partition being drained (expired leases) grow the total as they appear.
        if total.is_some() {
            bar.set_length((moved + left).max(bar.length().unwrap_or(0)));
        }
        bar.set_position(moved);
        bar.set_message(if last.error.is_empty() {
            format!("{left} left")
        } else {
            format!("{left} left, retrying: {}", last.error)
        });
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if json {
        print(true, &last, task_line);
    } else {
        println!(
            "{}  ({:.1}s, {:.0} items/s)",
            task_line(&last),
            secs,
            last.moved as f64 / secs.max(0.001)
        );
    }
    if last.status == "failed" {
        return Err(format!("rebalance task {} failed: {}", last.task_id, last.error));
    }
    Ok(())
}
