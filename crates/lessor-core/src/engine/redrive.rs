//! Dead-letter redrive: a server-side task that moves items from a dead-letter queue back to the queues they came
//! from (or to one named queue), optionally filtered and rate-limited, with an id, progress and cancellation.

use crate::time::Ts;

/// What a redrive moves, and where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedriveRequest {
    /// The dead-letter queue to move items out of (it must be some queue's `dead_queue`).
    pub dead_queue: String,
    /// Where items go; empty: back to the queue each item came from.
    pub target_queue: String,
    /// Filter: only items that came from this queue (empty: any).
    pub source_queue: String,
    /// Filter: only items of this kind (empty: any).
    pub kind: String,
    /// Most items moved per second (0: as fast as storage allows).
    pub rate_per_sec: u32,
    /// Most items moved in all (0: every matching item present when the task runs).
    pub max_items: u64,
}

/// Where a redrive task stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedriveStatus {
    /// Moving items.
    #[default]
    Running,
    /// Every matching item was moved (or `max_items` reached).
    Completed,
    /// Stopped by a cancel request; items moved so far stay moved.
    Cancelled,
    /// Stopped by an error that retrying does not fix (a target queue deleted...); see the task's `error`.
    Failed,
}

impl RedriveStatus {
    /// The status as a word, on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            RedriveStatus::Running => "running",
            RedriveStatus::Completed => "completed",
            RedriveStatus::Cancelled => "cancelled",
            RedriveStatus::Failed => "failed",
        }
    }
}

/// A redrive task as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedriveTask {
    /// The task id.
    pub id: String,
    /// What it moves.
    pub request: RedriveRequest,
    /// Where it stands.
    pub status: RedriveStatus,
    /// Items moved so far.
    pub moved: u64,
    /// Items looked at and left in the dead-letter queue (filtered out, or leased by a consumer).
    pub skipped: u64,
    /// Items of the dead-letter queue when the task last looked (ready, leased and scheduled).
    pub remaining: u64,
    /// Why the task failed; empty otherwise.
    pub error: String,
    /// When it was started.
    pub created_at: Ts,
    /// When its progress was last saved.
    pub updated_at: Ts,
}
