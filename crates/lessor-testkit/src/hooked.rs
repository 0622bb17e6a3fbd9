//! Storage wrappers for tests that must make a chosen storage call fail, stop, or announce itself: a
//! [`HookedStore`] (with the [`HookedPartition`]s it opens), a [`HookedQueues`] and a [`HookedAuth`] forward every
//! call to the store they wrap, and run a [`Hook`] before and after it.
//!
//! Every method of the storage traits is forwarded, including those the traits give a default for, so a wrapped
//! store behaves as the bare one does; the hook sees each call as a [`Call`] (which operation, on which queue and
//! partition, with which metadata keys). A [`Gate`] is the hook most race tests want: it stops one chosen call until
//! the test lets it go, so the other side of a race runs exactly in that window.

use std::fmt;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::auth::store::{CheckFailed, Commit, Write};
use lessor_core::auth::AuthStore;
use lessor_core::error::{ItemError, StorageError};
use lessor_core::storage::{
    LifecycleOutcome, LifecyclePolicy, Partition, PartitionSnapshot, PartitionStore, QueuesStore, RetryOp,
    RetryOutcome,
};
use lessor_core::time::Ts;
use lessor_core::types::{
    ClearRequest, DedupRecord, Item, ItemId, NewItem, PartitionCounts, PartitionStats, QueueInfo, SweepReport,
};
use tokio::sync::Semaphore;

/// Which storage call is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`PartitionStore::create`].
    Create,
    /// [`PartitionStore::open`].
    Open,
    /// [`PartitionStore::destroy`].
    Destroy,
    /// [`PartitionStore::destroy_many`] (the partitions are not in [`Call::partition`]).
    DestroyMany,
    /// [`Partition::produce`] and [`Partition::produce_reporting`].
    Produce,
    /// [`Partition::lease`].
    Lease,
    /// [`Partition::complete`].
    Complete,
    /// [`Partition::extend`].
    Extend,
    /// [`Partition::retry`].
    Retry,
    /// [`Partition::lifecycle`].
    Lifecycle,
    /// [`Partition::dedup_records`].
    DedupRecords,
    /// [`Partition::import_dedup`].
    ImportDedup,
    /// [`Partition::dead_items`].
    DeadItems,
    /// [`Partition::remove_dead`].
    RemoveDead,
    /// [`Partition::next_deadline`].
    NextDeadline,
    /// [`Partition::counts`].
    Counts,
    /// [`Partition::stats`].
    Stats,
    /// [`Partition::list`].
    List,
    /// [`Partition::import`].
    Import,
    /// [`Partition::snapshot`] and [`Partition::reference_snapshot`].
    Snapshot,
    /// A page read from a snapshot taken through a [`HookedPartition`] ([`PartitionSnapshot::next`] and
    /// [`PartitionSnapshot::next_within`]).
    SnapshotRead,
    /// [`Partition::delete`].
    Delete,
    /// [`Partition::clear`].
    Clear,
    /// [`QueuesStore::get`].
    QueueGet,
    /// [`QueuesStore::add`].
    QueueAdd,
    /// [`QueuesStore::update`].
    QueueUpdate,
    /// [`QueuesStore::delete`].
    QueueDelete,
    /// [`QueuesStore::list`].
    QueueList,
    /// [`AuthStore::get`].
    AuthGet,
    /// [`AuthStore::scan`].
    AuthScan,
    /// [`AuthStore::commit`].
    AuthCommit,
    /// [`AuthStore::generation`].
    AuthGeneration,
}

impl Op {
    /// Whether this is a call on an opened partition (not on a store).
    pub fn on_partition(self) -> bool {
        !matches!(
            self,
            Op::Create
                | Op::Open
                | Op::Destroy
                | Op::DestroyMany
                | Op::QueueGet
                | Op::QueueAdd
                | Op::QueueUpdate
                | Op::QueueDelete
                | Op::QueueList
                | Op::AuthGet
                | Op::AuthScan
                | Op::AuthCommit
                | Op::AuthGeneration
        )
    }
}

/// One storage call, as a hook sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The operation.
    pub op: Op,
    /// The queue the call is about: the partition's queue, the queue a store call names, the queue definition's
    /// name (the pivot of a [`Op::QueueList`]); empty for metadata calls.
    pub queue: String,
    /// The partition, for partition calls and store calls that name one.
    pub partition: Option<u32>,
    /// Metadata calls: the key of a get, the prefix of a scan, the keys a commit puts (not those it deletes).
    pub keys: Vec<Vec<u8>>,
}

impl Call {
    fn new(op: Op, queue: &str, partition: Option<u32>) -> Call {
        Call {
            op,
            queue: queue.to_string(),
            partition,
            keys: Vec::new(),
        }
    }

    fn auth(op: Op, keys: Vec<Vec<u8>>) -> Call {
        Call {
            op,
            queue: String::new(),
            partition: None,
            keys,
        }
    }

    /// Whether one of [`Call::keys`] starts with `tag` (the table of a metadata record).
    pub fn touches_table(&self, tag: u8) -> bool {
        self.keys.iter().any(|k| k.first() == Some(&tag))
    }
}

/// What a test runs around the wrapped calls.
#[async_trait]
pub trait Hook: Send + Sync + 'static {
    /// Runs before the call; an error is the call's result (the wrapped store is not called then). It may also
    /// wait, which stops the call there.
    async fn before(&self, call: &Call) -> Result<(), StorageError> {
        let _ = call;
        Ok(())
    }

    /// Runs after the wrapped store answered (whatever it answered), before the caller sees the answer.
    async fn after(&self, call: &Call) {
        let _ = call;
    }

    /// Sees how many items and payload bytes a partition call carried: what a read (lease, list, dead items)
    /// returned, or what a write (produce, import) was given. Tests of the byte bounds on bulk paths read it.
    fn carried(&self, call: &Call, items: usize, bytes: u64) {
        let _ = (call, items, bytes);
    }
}

/// The payload bytes of `items`.
fn bytes_of<'a>(items: impl Iterator<Item = &'a bytes::Bytes>) -> u64 {
    items.map(|p| p.len() as u64).sum()
}

/// [`hooked`] for a call that returns items: the hook also sees what came back.
async fn hooked_items<T, Fut>(
    hook: &dyn Hook,
    call: Call,
    f: Fut,
    items: impl Fn(&T) -> &[Item],
) -> Result<T, StorageError>
where
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let r = hooked(hook, call.clone(), f).await?;
    let got = items(&r);
    hook.carried(&call, got.len(), bytes_of(got.iter().map(|it| &it.payload)));
    Ok(r)
}

/// A hook that only runs `f` before each call: `f` fails the calls it returns an error for.
pub fn before<F>(f: F) -> Arc<dyn Hook>
where
    F: Fn(&Call) -> Result<(), StorageError> + Send + Sync + 'static,
{
    struct Before<F>(F);

    #[async_trait]
    impl<F> Hook for Before<F>
    where
        F: Fn(&Call) -> Result<(), StorageError> + Send + Sync + 'static,
    {
        async fn before(&self, call: &Call) -> Result<(), StorageError> {
            (self.0)(call)
        }
    }

    Arc::new(Before(f))
}

/// A hook that does nothing (a wrapper whose calls only some tests hook).
pub fn nothing() -> Arc<dyn Hook> {
    before(|_| Ok(()))
}

/// Stops one chosen call: once armed with `skip`, the calls it watches (those `watch` accepts) pass `skip` times,
/// then the next one waits for [`Gate::release`] (and says so through [`Gate::reached`]); later calls pass. Unarmed,
/// everything passes.
pub struct Gate {
    watch: Box<dyn Fn(&Call) -> bool + Send + Sync>,
    left: AtomicIsize,
    reached: Semaphore,
    release: Semaphore,
}

impl Gate {
    /// A gate watching the calls `watch` accepts, unarmed.
    pub fn on(watch: impl Fn(&Call) -> bool + Send + Sync + 'static) -> Arc<Gate> {
        Arc::new(Gate {
            watch: Box::new(watch),
            left: AtomicIsize::new(-1),
            reached: Semaphore::new(0),
            release: Semaphore::new(0),
        })
    }

    /// Stops the watched call after the next `skip` ones.
    pub fn arm(&self, skip: isize) {
        self.left.store(skip, Ordering::SeqCst);
    }

    /// A watched call: stops it if it is the chosen one (for hooks of their own that use a gate).
    pub async fn pass(&self) {
        if self.left.load(Ordering::SeqCst) < 0 {
            return;
        }
        if self.left.fetch_sub(1, Ordering::SeqCst) == 0 {
            self.reached.add_permits(1);
            self.release.acquire().await.expect("release").forget();
        }
    }

    /// Waits (10 s at most, then panics) until the chosen call is stopped at the gate.
    pub async fn reached(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.reached.acquire())
            .await
            .expect("the gated call is reached")
            .expect("reached")
            .forget();
    }

    /// Lets the stopped call go on.
    pub fn release(&self) {
        self.release.add_permits(1);
    }
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Hook for Gate {
    async fn before(&self, call: &Call) -> Result<(), StorageError> {
        if (self.watch)(call) {
            self.pass().await;
        }
        Ok(())
    }
}

/// Runs `f` (the wrapped call) between the hook's `before` and `after`.
async fn hooked<T, Fut>(hook: &dyn Hook, call: Call, f: Fut) -> Result<T, StorageError>
where
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    hook.before(&call).await?;
    let r = f.await;
    hook.after(&call).await;
    r
}

/// A [`PartitionStore`] that runs a hook around each of its calls and of the calls of the partitions it opens.
pub struct HookedStore {
    inner: Arc<dyn PartitionStore>,
    hook: Arc<dyn Hook>,
}

impl HookedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn PartitionStore>, hook: Arc<dyn Hook>) -> HookedStore {
        HookedStore { inner, hook }
    }
}

impl fmt::Debug for HookedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl PartitionStore for HookedStore {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }
    fn max_partitions(&self) -> u32 {
        self.inner.max_partitions()
    }
    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let call = Call::new(Op::Create, queue, None);
        hooked(&*self.hook, call, self.inner.create(queue, partitions)).await
    }
    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        let call = Call::new(Op::Open, queue, Some(partition));
        let inner = hooked(&*self.hook, call, self.inner.open(queue, partition)).await?;
        Ok(Arc::new(HookedPartition {
            inner,
            hook: self.hook.clone(),
            queue: queue.to_string(),
            partition,
        }))
    }
    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        let call = Call::new(Op::Destroy, queue, Some(partition));
        hooked(&*self.hook, call, self.inner.destroy(queue, partition)).await
    }
    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let call = Call::new(Op::DestroyMany, queue, None);
        hooked(&*self.hook, call, self.inner.destroy_many(queue, partitions)).await
    }
    async fn create_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        let call = Call::new(Op::Create, queue, None);
        let inner = self.inner.create_incarnation(queue, incarnation, partitions);
        hooked(&*self.hook, call, inner).await
    }
    async fn open_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        let call = Call::new(Op::Open, queue, Some(partition));
        let inner = self.inner.open_incarnation(queue, incarnation, partition);
        let inner = hooked(&*self.hook, call, inner).await?;
        Ok(Arc::new(HookedPartition {
            inner,
            hook: self.hook.clone(),
            queue: queue.to_string(),
            partition,
        }))
    }
    async fn destroy_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<(), StorageError> {
        // A destroy like any other for the hooks.
        let call = Call::new(Op::Destroy, queue, Some(partition));
        let inner = self.inner.destroy_incarnation(queue, incarnation, partition);
        hooked(&*self.hook, call, inner).await
    }
    async fn destroy_many_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        let call = Call::new(Op::DestroyMany, queue, None);
        let inner = self
            .inner
            .destroy_many_incarnation(queue, incarnation, partitions);
        hooked(&*self.hook, call, inner).await
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<lessor_core::storage::Notice>> {
        self.inner.notices()
    }
    async fn sweep_objects(&self) -> Option<Result<SweepReport, StorageError>> {
        self.inner.sweep_objects().await
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}

/// A partition opened by a [`HookedStore`].
pub struct HookedPartition {
    inner: Arc<dyn Partition>,
    hook: Arc<dyn Hook>,
    queue: String,
    partition: u32,
}

impl HookedPartition {
    fn call(&self, op: Op) -> Call {
        Call::new(op, &self.queue, Some(self.partition))
    }

    /// `inner` with its page reads seen by the hook, so that tests of the byte bounds see what a backup or a
    /// migration read in one call.
    fn hooked_snapshot(&self, inner: Box<dyn PartitionSnapshot>) -> Box<dyn PartitionSnapshot> {
        Box::new(HookedSnapshot {
            inner,
            hook: self.hook.clone(),
            call: self.call(Op::SnapshotRead),
        })
    }
}

/// A snapshot taken through a [`HookedPartition`]: every page read is an [`Op::SnapshotRead`] call.
struct HookedSnapshot {
    inner: Box<dyn PartitionSnapshot>,
    hook: Arc<dyn Hook>,
    call: Call,
}

impl fmt::Debug for HookedSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedSnapshot")
            .field("inner", &self.inner)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl PartitionSnapshot for HookedSnapshot {
    async fn next(&mut self, limit: usize) -> Result<Vec<Item>, StorageError> {
        hooked_items(&*self.hook, self.call.clone(), self.inner.next(limit), |r| &r[..]).await
    }
    async fn next_within(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        hooked_items(
            &*self.hook,
            self.call.clone(),
            self.inner.next_within(limit, max_bytes),
            |r| &r[..],
        )
        .await
    }
}

impl fmt::Debug for HookedPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedPartition")
            .field("queue", &self.queue)
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Partition for HookedPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        let call = self.call(Op::Produce);
        self.hook
            .carried(&call, items.len(), bytes_of(items.iter().map(|it| &it.payload)));
        hooked(&*self.hook, call, self.inner.produce(items)).await
    }
    async fn produce_reporting(&self, items: Vec<NewItem>) -> Result<(Vec<ItemId>, Vec<bool>), StorageError> {
        self.hook.carried(
            &self.call(Op::Produce),
            items.len(),
            bytes_of(items.iter().map(|it| &it.payload)),
        );
        hooked(
            &*self.hook,
            self.call(Op::Produce),
            self.inner.produce_reporting(items),
        )
        .await
    }
    async fn lease(&self, n: usize, deadline: Ts) -> Result<Vec<Item>, StorageError> {
        hooked_items(
            &*self.hook,
            self.call(Op::Lease),
            self.inner.lease(n, deadline),
            |r| r,
        )
        .await
    }
    async fn lease_within(
        &self,
        n: usize,
        deadline: Ts,
        max: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        hooked_items(
            &*self.hook,
            self.call(Op::Lease),
            self.inner.lease_within(n, deadline, max),
            |r| &r.0,
        )
        .await
    }
    async fn complete(&self, r: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        hooked(&*self.hook, self.call(Op::Complete), self.inner.complete(r)).await
    }
    async fn extend(&self, r: Vec<(Vec<ItemId>, Ts)>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        hooked(&*self.hook, self.call(Op::Extend), self.inner.extend(r)).await
    }
    async fn retry(
        &self,
        r: Vec<Vec<RetryOp>>,
        p: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        hooked(&*self.hook, self.call(Op::Retry), self.inner.retry(r, p)).await
    }
    async fn lifecycle(
        &self,
        now: Ts,
        p: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        hooked(
            &*self.hook,
            self.call(Op::Lifecycle),
            self.inner.lifecycle(now, p, limit),
        )
        .await
    }
    async fn dedup_records(&self, now: Ts) -> Result<Vec<DedupRecord>, StorageError> {
        hooked(
            &*self.hook,
            self.call(Op::DedupRecords),
            self.inner.dedup_records(now),
        )
        .await
    }
    async fn import_dedup(&self, records: Vec<DedupRecord>) -> Result<(), StorageError> {
        hooked(
            &*self.hook,
            self.call(Op::ImportDedup),
            self.inner.import_dedup(records),
        )
        .await
    }
    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        hooked_items(
            &*self.hook,
            self.call(Op::DeadItems),
            self.inner.dead_items(limit),
            |r| r,
        )
        .await
    }
    async fn dead_items_within(&self, limit: usize, max: u64) -> Result<(Vec<Item>, bool), StorageError> {
        hooked_items(
            &*self.hook,
            self.call(Op::DeadItems),
            self.inner.dead_items_within(limit, max),
            |r| &r.0,
        )
        .await
    }
    async fn dead_count(&self) -> Result<u64, StorageError> {
        hooked(&*self.hook, self.call(Op::DeadItems), self.inner.dead_count()).await
    }
    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        hooked(
            &*self.hook,
            self.call(Op::RemoveDead),
            self.inner.remove_dead(ids),
        )
        .await
    }
    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        hooked(
            &*self.hook,
            self.call(Op::NextDeadline),
            self.inner.next_deadline(),
        )
        .await
    }
    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        hooked(&*self.hook, self.call(Op::Counts), self.inner.counts()).await
    }
    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        hooked(&*self.hook, self.call(Op::Stats), self.inner.stats(now)).await
    }
    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        hooked_items(
            &*self.hook,
            self.call(Op::List),
            self.inner.list(pivot, limit, scheduled),
            |r| r,
        )
        .await
    }
    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        hooked_items(
            &*self.hook,
            self.call(Op::List),
            self.inner.list_within(pivot, limit, scheduled, max),
            |r| &r.0,
        )
        .await
    }
    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        let call = self.call(Op::Import);
        self.hook
            .carried(&call, items.len(), bytes_of(items.iter().map(|it| &it.payload)));
        hooked(&*self.hook, call, self.inner.import(items)).await
    }
    async fn import_moved(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        let call = self.call(Op::Import);
        self.hook
            .carried(&call, items.len(), bytes_of(items.iter().map(|it| &it.payload)));
        hooked(&*self.hook, call, self.inner.import_moved(items)).await
    }
    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        let inner = hooked(&*self.hook, self.call(Op::Snapshot), self.inner.snapshot()).await?;
        Ok(self.hooked_snapshot(inner))
    }
    async fn reference_snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        let inner = hooked(
            &*self.hook,
            self.call(Op::Snapshot),
            self.inner.reference_snapshot(),
        )
        .await?;
        Ok(self.hooked_snapshot(inner))
    }
    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        hooked(&*self.hook, self.call(Op::Delete), self.inner.delete(ids)).await
    }
    async fn clear(&self, r: ClearRequest) -> Result<(), StorageError> {
        hooked(&*self.hook, self.call(Op::Clear), self.inner.clear(r)).await
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}

/// A [`QueuesStore`] that runs a hook around each of its calls, and around those of its metadata store (see
/// [`HookedAuth`]).
pub struct HookedQueues {
    inner: Arc<dyn QueuesStore>,
    auth: Arc<dyn AuthStore>,
    hook: Arc<dyn Hook>,
}

impl HookedQueues {
    /// Wraps `inner` and its metadata store, both with `hook`.
    pub fn new(inner: Arc<dyn QueuesStore>, hook: Arc<dyn Hook>) -> HookedQueues {
        let auth = Arc::new(HookedAuth::new(inner.auth(), hook.clone()));
        HookedQueues { inner, auth, hook }
    }
}

impl fmt::Debug for HookedQueues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedQueues")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl QueuesStore for HookedQueues {
    async fn get(&self, name: &str) -> Result<Option<QueueInfo>, StorageError> {
        hooked(
            &*self.hook,
            Call::new(Op::QueueGet, name, None),
            self.inner.get(name),
        )
        .await
    }
    async fn add(&self, info: &QueueInfo) -> Result<(), StorageError> {
        hooked(
            &*self.hook,
            Call::new(Op::QueueAdd, &info.name, None),
            self.inner.add(info),
        )
        .await
    }
    async fn update(&self, info: &QueueInfo) -> Result<(), StorageError> {
        let call = Call::new(Op::QueueUpdate, &info.name, None);
        hooked(&*self.hook, call, self.inner.update(info)).await
    }
    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        hooked(
            &*self.hook,
            Call::new(Op::QueueDelete, name, None),
            self.inner.delete(name),
        )
        .await
    }
    async fn delete_incarnation(&self, name: &str, created_at: Ts) -> Result<(), StorageError> {
        hooked(
            &*self.hook,
            Call::new(Op::QueueDelete, name, None),
            self.inner.delete_incarnation(name, created_at),
        )
        .await
    }
    async fn list(&self, pivot: &str, limit: usize) -> Result<Vec<QueueInfo>, StorageError> {
        let call = Call::new(Op::QueueList, pivot, None);
        hooked(&*self.hook, call, self.inner.list(pivot, limit)).await
    }
    // `ping` keeps the trait's default, a `list` through this wrapper: a hook that stops or fails the store's
    // calls then stops or fails health checks too, as the hand-written wrappers this replaced did.
    fn auth(&self) -> Arc<dyn AuthStore> {
        self.auth.clone()
    }
    async fn close(&self) {
        self.inner.close().await;
    }
}

/// An [`AuthStore`] (the metadata store: permissions, task records, journals) that runs a hook around each of its
/// calls.
pub struct HookedAuth {
    inner: Arc<dyn AuthStore>,
    hook: Arc<dyn Hook>,
}

impl HookedAuth {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn AuthStore>, hook: Arc<dyn Hook>) -> HookedAuth {
        HookedAuth { inner, hook }
    }
}

impl fmt::Debug for HookedAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookedAuth")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl AuthStore for HookedAuth {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        let call = Call::auth(Op::AuthGet, vec![key.to_vec()]);
        hooked(&*self.hook, call, self.inner.get(key)).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError> {
        let call = Call::auth(Op::AuthScan, vec![prefix.to_vec()]);
        hooked(&*self.hook, call, self.inner.scan(prefix, from, limit)).await
    }
    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError> {
        let puts = commit
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Put(k, _) => Some(k.clone()),
                Write::Delete(_) => None,
            })
            .collect();
        hooked(
            &*self.hook,
            Call::auth(Op::AuthCommit, puts),
            self.inner.commit(commit),
        )
        .await
    }
    async fn generation(&self) -> Result<u64, StorageError> {
        hooked(
            &*self.hook,
            Call::auth(Op::AuthGeneration, Vec::new()),
            self.inner.generation(),
        )
        .await
    }
}
