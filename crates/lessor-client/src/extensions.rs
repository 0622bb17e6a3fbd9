//! Typed calls of Lessor's extension routes, which Querator does not serve (it answers them 501): lease extension,
//! pause and resume, browse, dead-letter redrive, online rebalance (`queues.rebalance`), and the sweep of orphaned
//! payload objects (`offload.sweep`).
//!
//! Each is [`Client::call`] with its route filled in. The extension fields of Querator's own messages
//! (`QueueProduceItem.priority` and `dedup_id`, `QueueInfo.dedup_window`, `retry_backoff`, `max_lease_timeout`,
//! `paused`) go through the usual calls ([`Client::queue_produce`], [`Client::queues_create`], ...).

use lessor_proto::{
    OffloadSweepRequest, OffloadSweepResponse, QueueBrowseRequest, QueueBrowseResponse, QueueExtendRequest,
    QueuePauseRequest, QueueRebalanceRequest, QueueRedriveRequest, QueueResumeRequest, RebalanceListRequest,
    RebalanceListResponse, RebalanceTask, RebalanceTaskRequest, RedriveListRequest, RedriveListResponse,
    RedriveTask, RedriveTaskRequest,
};

use crate::{routes, Client, ClientError};

impl Client {
    /// `POST /v1/offload.sweep`: runs the sweeper of orphaned payload objects now, of the store `req` names or of
    /// every store with object storage, and says what it did per store. Needs `queue.clear` in `_system`.
    ///
    /// # Errors
    /// Any [`ClientError`]; a 400 [`ClientError::Api`] when the store does not exist or has no object storage.
    pub async fn offload_sweep(
        &self,
        req: &OffloadSweepRequest,
    ) -> Result<OffloadSweepResponse, ClientError> {
        self.call::<routes::OffloadSweep>(req).await
    }

    /// `POST /v1/queue.extend`: pushes the lease deadline of held items to now + `lease_timeout` (the queue's
    /// when empty), all of them or none. An id whose lease already ended is a 400 naming it.
    ///
    /// # Errors
    /// Any [`ClientError`]; past the queue's `max_lease_timeout` is a 400 [`ClientError::Api`].
    pub async fn queue_extend(&self, req: &QueueExtendRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueExtend>(req).await.map(drop)
    }

    /// `POST /v1/queue.pause`: the queue keeps accepting produce, and leases wait until it is resumed.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_pause(&self, req: &QueuePauseRequest) -> Result<(), ClientError> {
        self.call::<routes::QueuePause>(req).await.map(drop)
    }

    /// `POST /v1/queue.resume`: serves leases again, the waiting ones first.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_resume(&self, req: &QueueResumeRequest) -> Result<(), ClientError> {
        self.call::<routes::QueueResume>(req).await.map(drop)
    }

    /// `POST /v1/queue.browse`: one page of a partition's items by state (and priority), without leasing them.
    /// Continue with the reply's `next_pivot` until it is empty.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn queue_browse(&self, req: &QueueBrowseRequest) -> Result<QueueBrowseResponse, ClientError> {
        self.call::<routes::QueueBrowse>(req).await
    }

    /// `POST /v1/queue.redrive`: starts a server-side task moving items out of a dead-letter queue; the reply is
    /// the task as started (follow it with [`Client::redrive_get`]).
    ///
    /// # Errors
    /// Any [`ClientError`]; a queue that is no queue's `dead_queue` is a 400 [`ClientError::Api`].
    pub async fn queue_redrive(&self, req: &QueueRedriveRequest) -> Result<RedriveTask, ClientError> {
        self.call::<routes::QueueRedrive>(req).await
    }

    /// `POST /v1/redrive.list`: redrive tasks, newest first (one dead-letter queue's, or all with an empty name).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn redrive_list(&self, req: &RedriveListRequest) -> Result<RedriveListResponse, ClientError> {
        self.call::<routes::RedriveList>(req).await
    }

    /// `POST /v1/redrive.get`: one redrive task and its progress.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn redrive_get(&self, req: &RedriveTaskRequest) -> Result<RedriveTask, ClientError> {
        self.call::<routes::RedriveGet>(req).await
    }

    /// `POST /v1/redrive.cancel`: stops a running task (items moved so far stay moved); returns the task.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn redrive_cancel(&self, req: &RedriveTaskRequest) -> Result<RedriveTask, ClientError> {
        self.call::<routes::RedriveCancel>(req).await
    }

    /// `POST /v1/queues.rebalance`: starts an online rebalance task (moves of partitions between stores, a
    /// spread by affinity, or a new partition count); the reply is the task as started (follow it with
    /// [`Client::rebalance_get`]). A growth is done at once and comes back completed.
    ///
    /// # Errors
    /// Any [`ClientError`]; a request naming a missing partition or store, a shared store, or a queue with a
    /// rebalance already running is a 400 [`ClientError::Api`].
    pub async fn queues_rebalance(&self, req: &QueueRebalanceRequest) -> Result<RebalanceTask, ClientError> {
        self.call::<routes::QueuesRebalance>(req).await
    }

    /// `POST /v1/rebalance.list`: rebalance tasks, newest first (one queue's, or all with an empty name).
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn rebalance_list(
        &self,
        req: &RebalanceListRequest,
    ) -> Result<RebalanceListResponse, ClientError> {
        self.call::<routes::RebalanceList>(req).await
    }

    /// `POST /v1/rebalance.get`: one rebalance task and its progress.
    ///
    /// # Errors
    /// Any [`ClientError`].
    pub async fn rebalance_get(&self, req: &RebalanceTaskRequest) -> Result<RebalanceTask, ClientError> {
        self.call::<routes::RebalanceGet>(req).await
    }

    /// `POST /v1/rebalance.cancel`: cancels a running rebalance task; returns it as it stands (`cancelling` until
    /// the move under way is settled, then `cancelled`; a task that already ended comes back unchanged).
    ///
    /// # Errors
    /// Any [`ClientError`]; an unknown task id is a 400 [`ClientError::Api`].
    pub async fn rebalance_cancel(&self, req: &RebalanceTaskRequest) -> Result<RebalanceTask, ClientError> {
        self.call::<routes::RebalanceCancel>(req).await
    }
}
