//! The durable Raft log, vote and committed index, in a redb database.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{ReadableTable, TableDefinition};

use crate::db::{Db, DbError};
use crate::types::TypeConfig;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type NodeId = u64;

fn io_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::<NodeId>::write(&std::io::Error::other(e.to_string())).into()
}

/// The log store; cheap to clone (readers share the database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
}

impl LogStore {
    /// Opens (or creates) the log in `db`.
    pub fn new(db: Arc<Db>) -> Result<LogStore, DbError> {
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(LogStore { db })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        match t.get(key)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(value)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(META)?;
            t.insert(key, bytes.as_slice())?;
        }
        Ok(tx.commit()?)
    }
}

impl LogStore {
    /// Deletes the log entries whose indexes fall in `range`, in one transaction.
    fn remove_entries(&self, range: impl RangeBounds<u64>) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(LOG)?;
            let keys = t
                .range(range)?
                .map(|r| r.map(|(k, _)| k.value()))
                .collect::<Result<Vec<u64>, _>>()?;
            for k in keys {
                t.remove(k)?;
            }
        }
        Ok(tx.commit()?)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let tx = self.db.begin_read().map_err(io_err)?;
        let t = tx.open_table(LOG).map_err(io_err)?;
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in t.range(start..).map_err(io_err)? {
            let (k, v) = item.map_err(io_err)?;
            if !range.contains(&k.value()) {
                break;
            }
            out.push(serde_json::from_slice(v.value()).map_err(io_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let tx = self.db.begin_read().map_err(io_err)?;
        let t = tx.open_table(LOG).map_err(io_err)?;
        let last = match t.last().map_err(io_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(io_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        Ok(self.put_meta("vote", vote)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_meta("vote")?)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        Ok(self.put_meta("committed", &committed)?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // One durable redb transaction per batch: the callback means "on disk".
        let tx = self.db.begin_write().map_err(io_err)?;
        {
            let mut t = tx.open_table(LOG).map_err(io_err)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(io_err)?;
                t.insert(e.log_id.index, bytes.as_slice()).map_err(io_err)?;
            }
        }
        let res = tx
            .commit()
            .map_err(|e| std::io::Error::other(e.to_string()));
        let ok = res.is_ok();
        callback.log_io_completed(res);
        if ok {
            Ok(())
        } else {
            Err(io_err("log append failed"))
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        Ok(self.remove_entries(log_id.index..)?)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta("last_purged", &log_id)?;
        Ok(self.remove_entries(..=log_id.index)?)
    }
}
