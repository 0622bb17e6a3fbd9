//! The commands of Lessor's extension routes: `lessor extend`, `pause`, `resume`, `browse` and `redrive` (with
//! `redrive list|get|cancel`). Output follows the other commands: a line or a table by default, the reply's JSON
//! with `--json`.

use std::time::Duration;

use clap::{Args, Subcommand};
use lessor_client::Client;
use lessor_proto as pb;

use super::auth::{done, table, when};
use super::{api, print};

/// `lessor extend` flags.
#[derive(Args, Debug)]
pub struct ExtendArgs {
    /// Queue name.
    queue: String,
    /// Ids from the lease.
    #[arg(required = true)]
    ids: Vec<String>,
    /// Partition from the lease.
    #[arg(short, long)]
    partition: i32,
    /// New lease length from now (Go duration); the queue's lease timeout when absent.
    #[arg(long)]
    lease_timeout: Option<String>,
    /// Request timeout.
    #[arg(long, default_value = "30s")]
    timeout: String,
}

/// `lessor browse` flags.
#[derive(Args, Debug)]
pub struct BrowseArgs {
    /// Queue name.
    queue: String,
    /// Partition to browse.
    #[arg(long, default_value_t = 0)]
    partition: i32,
    /// Only items in this state (default: ready and leased).
    #[arg(long, value_parser = ["ready", "leased", "scheduled"])]
    state: Option<String>,
    /// Only items of this priority (0-9).
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
    /// Most items to show (1-1000; 0: the server's default, 100).
    #[arg(long, default_value_t = 0)]
    limit: i32,
    /// Start at this item id (inclusive); a page's "next pivot".
    #[arg(long, default_value = "", hide_default_value = true)]
    pivot: String,
}

/// `lessor redrive ...`: start a redrive of a dead-letter queue, or look at the tasks.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RedriveArgs {
    #[command(subcommand)]
    cmd: Option<RedriveCmd>,
    #[command(flatten)]
    start: RedriveStart,
}

/// `lessor redrive DLQ` flags.
#[derive(Args, Debug)]
pub struct RedriveStart {
    /// The dead-letter queue to move items out of.
    dead_queue: Option<String>,
    /// Move every item to this queue (default: back to the queue each came from).
    #[arg(long = "to", value_name = "QUEUE")]
    target_queue: Option<String>,
    /// Only items that came from this queue.
    #[arg(long)]
    source_queue: Option<String>,
    /// Only items of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// Most items moved per second (default: no limit).
    #[arg(
        long = "rate",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    rate_per_sec: i32,
    /// Most items moved in all (default: every matching item).
    #[arg(
        long = "max",
        value_name = "N",
        default_value_t = 0,
        hide_default_value = true
    )]
    max_items: i64,
    /// Wait until the task ends, printing its progress.
    #[arg(long)]
    wait: bool,
}

/// `lessor redrive list|get|cancel`.
#[derive(Subcommand, Debug)]
pub enum RedriveCmd {
    /// List redrive tasks, newest first.
    List {
        /// Only the tasks of this dead-letter queue (without it, every task: needs permissions in `_system`).
        dead_queue: Option<String>,
    },
    /// Show one redrive task.
    Get(TaskArgs),
    /// Cancel a running redrive task (items moved so far stay moved).
    Cancel(TaskArgs),
}

/// A task id, with the dead-letter queue whose namespace the permission is checked in.
#[derive(Args, Debug)]
pub struct TaskArgs {
    /// Task id (`rd-...`).
    task_id: String,
    /// The task's dead-letter queue (without it, the request needs permissions in `_system`).
    #[arg(long)]
    dead_queue: Option<String>,
}

impl TaskArgs {
    fn request(self) -> pb::RedriveTaskRequest {
        pb::RedriveTaskRequest {
            task_id: self.task_id,
            dead_queue: self.dead_queue.unwrap_or_default(),
        }
    }
}

/// `lessor extend`.
pub async fn extend(c: &Client, json: bool, a: ExtendArgs) -> Result<(), String> {
    let n = a.ids.len();
    c.queue_extend(&pb::QueueExtendRequest {
        queue_name: a.queue,
        partition: a.partition,
        ids: a.ids,
        lease_timeout: a.lease_timeout.unwrap_or_default(),
        request_timeout: a.timeout,
    })
    .await
    .map_err(api)?;
    done(json, format!("extended {n} leases"));
    Ok(())
}

/// `lessor pause` (`paused`) and `lessor resume`.
pub async fn pause(c: &Client, json: bool, queue: String, paused: bool) -> Result<(), String> {
    if paused {
        c.queue_pause(&pb::QueuePauseRequest {
            queue_name: queue.clone(),
        })
        .await
        .map_err(api)?;
        done(
            json,
            format!("paused queue '{queue}' (produce is accepted, leases wait)"),
        );
    } else {
        c.queue_resume(&pb::QueueResumeRequest {
            queue_name: queue.clone(),
        })
        .await
        .map_err(api)?;
        done(json, format!("resumed queue '{queue}'"));
    }
    Ok(())
}

/// `lessor offload ...`.
#[derive(Subcommand, Debug)]
pub enum OffloadCmd {
    /// Delete orphaned payload objects now (older than the store's `offload-grace`, referenced by no item), and
    /// show what was listed, deleted and spared.
    Sweep {
        /// Only this `partition-storage` entry (default: every one with `payload-offload`).
        #[arg(long)]
        store: Option<String>,
    },
}

/// `lessor offload sweep`.
pub async fn offload(c: &Client, json: bool, cmd: OffloadCmd) -> Result<(), String> {
    let OffloadCmd::Sweep { store } = cmd;
    let r = c
        .offload_sweep(&pb::OffloadSweepRequest {
            store: store.unwrap_or_default(),
        })
        .await
        .map_err(api)?;
    print(json, &r, |r| {
        table(
            &["STORE", "LISTED", "DELETED", "SPARED", "NOT OPEN HERE"],
            r.stores
                .iter()
                .map(|s| {
                    vec![
                        s.store.clone(),
                        s.listed.to_string(),
                        s.deleted.to_string(),
                        s.spared.to_string(),
                        s.not_open.to_string(),
                    ]
                })
                .collect(),
        )
    });
    Ok(())
}

/// A payload as one short line: text when it is printable UTF-8, else its size.
fn preview(payload: &[u8]) -> String {
    const MAX: usize = 40;
    match std::str::from_utf8(payload) {
        Ok(s) if !s.chars().any(char::is_control) => {
            if s.chars().count() > MAX {
                format!("{}...", s.chars().take(MAX).collect::<String>())
            } else {
                s.to_string()
            }
        }
        _ => format!("<{} bytes>", payload.len()),
    }
}

/// `lessor browse`.
pub async fn browse(c: &Client, json: bool, a: BrowseArgs) -> Result<(), String> {
    let r = c
        .queue_browse(&pb::QueueBrowseRequest {
            queue_name: a.queue,
            partition: a.partition,
            state: a.state.unwrap_or_default(),
            priority: a.priority,
            pivot: a.pivot,
            limit: a.limit,
        })
        .await
        .map_err(api)?;
    print(json, &r, |r| {
        let rows = r
            .items
            .iter()
            .map(|i| {
                let due = if i.state == "scheduled" {
                    when(&i.enqueue_at)
                } else {
                    when(&i.lease_deadline)
                };
                vec![
                    i.id.clone(),
                    i.state.clone(),
                    i.priority.to_string(),
                    i.attempts.to_string(),
                    i.holder.clone(),
                    due,
                    preview(&i.payload),
                ]
            })
            .collect();
        let mut s = table(
            &[
                "ID",
                "STATE",
                "PRIORITY",
                "ATTEMPTS",
                "HOLDER",
                "DEADLINE/DUE",
                "PAYLOAD",
            ],
            rows,
        );
        if !r.next_pivot.is_empty() {
            s.push_str(&format!("\nnext pivot: {}", r.next_pivot));
        }
        s
    });
    Ok(())
}

fn task_line(t: &pb::RedriveTask) -> String {
    let mut s = format!(
        "task {}  {}  moved={}  skipped={}  remaining={}",
        t.task_id, t.status, t.moved, t.skipped, t.remaining
    );
    if !t.error.is_empty() {
        s.push_str(&format!("  error: {}", t.error));
    }
    s
}

fn task_table(tasks: &[pb::RedriveTask]) -> String {
    let rows = tasks
        .iter()
        .map(|t| {
            vec![
                t.task_id.clone(),
                t.dead_queue.clone(),
                if t.target_queue.is_empty() {
                    "(sources)".to_string()
                } else {
                    t.target_queue.clone()
                },
                t.status.clone(),
                t.moved.to_string(),
                t.skipped.to_string(),
                t.remaining.to_string(),
                when(&t.created_at),
                t.error.clone(),
            ]
        })
        .collect();
    table(
        &[
            "TASK",
            "DEAD QUEUE",
            "TO",
            "STATUS",
            "MOVED",
            "SKIPPED",
            "REMAINING",
            "CREATED",
            "ERROR",
        ],
        rows,
    )
}

/// How often `redrive --wait` asks for progress.
const WAIT_POLL: Duration = Duration::from_millis(500);

/// `lessor redrive ...`.
pub async fn redrive(c: &Client, json: bool, a: RedriveArgs) -> Result<(), String> {
    match a.cmd {
        Some(RedriveCmd::List { dead_queue }) => {
            let r = c
                .redrive_list(&pb::RedriveListRequest {
                    dead_queue: dead_queue.unwrap_or_default(),
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| task_table(&r.items));
        }
        Some(RedriveCmd::Get(t)) => {
            let r = c.redrive_get(&t.request()).await.map_err(api)?;
            print(json, &r, |t| task_table(std::slice::from_ref(t)));
        }
        Some(RedriveCmd::Cancel(t)) => {
            let r = c.redrive_cancel(&t.request()).await.map_err(api)?;
            print(json, &r, task_line);
        }
        None => {
            let s = a.start;
            let Some(dead_queue) = s.dead_queue else {
                return Err(
                    "redrive: name the dead-letter queue (lessor redrive DLQ), or use list, get or cancel"
                        .into(),
                );
            };
            let task = c
                .queue_redrive(&pb::QueueRedriveRequest {
                    dead_queue: dead_queue.clone(),
                    target_queue: s.target_queue.unwrap_or_default(),
                    source_queue: s.source_queue.unwrap_or_default(),
                    kind: s.kind.unwrap_or_default(),
                    rate_per_sec: s.rate_per_sec,
                    max_items: s.max_items,
                })
                .await
                .map_err(api)?;
            if !s.wait {
                print(json, &task, task_line);
                return Ok(());
            }
            if !json {
                println!("{}", task_line(&task));
            }
            let req = pb::RedriveTaskRequest {
                task_id: task.task_id.clone(),
                dead_queue,
            };
            let mut last = task;
            while last.status == "running" {
                tokio::time::sleep(WAIT_POLL).await;
                let now = c.redrive_get(&req).await.map_err(api)?;
                if !json && (now.moved, now.skipped, &now.status) != (last.moved, last.skipped, &last.status)
                {
                    println!("{}", task_line(&now));
                }
                last = now;
            }
            if json {
                print(true, &last, task_line);
            }
            if last.status == "failed" {
                return Err(format!("redrive task {} failed: {}", last.task_id, last.error));
            }
        }
    }
    Ok(())
}
