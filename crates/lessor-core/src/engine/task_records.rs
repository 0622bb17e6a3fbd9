//! Server-side tasks (redrive, rebalance) kept as JSON records in the metadata store, one table per kind of task
//! under its own tag, so that a task survives restarts and any server sharing the store can see and take it over.
//! Writes are silent commits: they do not move the auth generation, so saving progress never makes servers drop
//! their permission caches.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Engine;
use crate::auth::records::{key, prefix};
use crate::auth::store::Commit;
use crate::error::QueueError;

/// Records scanned per page when listing a table.
const PAGE: usize = 500;

/// One table of task records: its tag in the metadata store and what its tasks are called in errors.
pub(crate) struct TaskTable {
    pub(crate) tag: u8,
    pub(crate) what: &'static str,
}

impl TaskTable {
    /// The record key of task `id`.
    pub(crate) fn key(&self, id: &str) -> Vec<u8> {
        key(self.tag, &[id])
    }

    /// The task `id`, if it is stored.
    pub(crate) async fn load<T: DeserializeOwned>(
        &self,
        engine: &Engine,
        id: &str,
    ) -> Result<Option<T>, QueueError> {
        let Some(v) = engine.auth_store().get(&self.key(id)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| QueueError::StorageFailed(format!("{} task '{id}' unreadable: {e}", self.what)))
    }

    /// Stores `task` under `id`, replacing what was there.
    pub(crate) async fn save<T: Serialize>(
        &self,
        engine: &Engine,
        id: &str,
        task: &T,
    ) -> Result<(), QueueError> {
        let mut c = Commit {
            silent: true,
            ..Default::default()
        };
        let v = serde_json::to_vec(task).map_err(|e| QueueError::StorageFailed(e.to_string()))?;
        c.put(self.key(id), v);
        engine
            .auth_store()
            .commit(c)
            .await?
            .map_err(|_| QueueError::StorageFailed(format!("{} task write refused", self.what)))
    }

    /// Reads task `id`, lets `change` edit it, and stores it again, under the engine's task lock, so that two
    /// writers of one record in this process (a runner saving progress, a cancel request) never undo each other's
    /// change. Returns the record as stored, or `None` when there is no such task (nothing is written then).
    pub(crate) async fn update<T: Serialize + DeserializeOwned>(
        &self,
        engine: &Engine,
        id: &str,
        change: impl FnOnce(&mut T),
    ) -> Result<Option<T>, QueueError> {
        let _guard = engine.inner.task_lock.lock().await;
        let Some(mut t) = self.load::<T>(engine, id).await? else {
            return Ok(None);
        };
        change(&mut t);
        self.save(engine, id, &t).await?;
        Ok(Some(t))
    }

    /// Every readable task of the table, in key order (records that do not decode are skipped).
    pub(crate) async fn all<T: DeserializeOwned>(&self, engine: &Engine) -> Result<Vec<T>, QueueError> {
        let p = prefix(self.tag, &[]);
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        loop {
            let page = engine.auth_store().scan(&p, &from, PAGE).await?;
            let full = page.len() == PAGE;
            for (k, v) in &page {
                if let Ok(t) = serde_json::from_slice::<T>(v) {
                    out.push(t);
                }
                from = k.to_vec();
                from.push(0);
            }
            if !full {
                return Ok(out);
            }
        }
    }
}
