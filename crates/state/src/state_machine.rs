//! The state machine: the cluster's tables in memory, snapshots persisted in redb. After a
//! restart it resumes from the last snapshot and Raft re-applies the committed log after it.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError};
use crate::types::{Applied, Command, Require, Tables, TypeConfig};

type NodeId = u64;
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

fn io_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::<NodeId>::write(&std::io::Error::other(e.to_string())).into()
}

/// Everything the state machine holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Data {
    /// Last log entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The membership in effect.
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// The tables.
    pub tables: Tables,
}

/// Read access to the tables without the database; see [`StateMachine::reader`].
#[derive(Clone)]
pub struct StateReader {
    data: Arc<RwLock<Data>>,
}

impl StateReader {
    /// Runs `f` on the current tables.
    pub fn read<T>(&self, f: impl FnOnce(&Tables) -> T) -> T {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        f(&d.tables)
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine; clones share the data.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Db>,
    data: Arc<RwLock<Data>>,
    applied: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    /// Opens the state machine, resuming from the persisted snapshot.
    pub fn new(db: Arc<Db>) -> Result<StateMachine, DbError> {
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOT)?;
        tx.commit()?;
        let sm = StateMachine {
            db,
            data: Arc::new(RwLock::new(Data::default())),
            applied: Arc::new(tokio::sync::watch::channel(0).0),
        };
        if let Some(s) = sm.load_snapshot()? {
            let d: Data = serde_json::from_slice(&s.data)?;
            sm.applied
                .send_replace(d.last_applied.map(|l| l.index).unwrap_or(0));
            *sm.data.write().unwrap_or_else(|p| p.into_inner()) = d;
        }
        Ok(sm)
    }

    /// The index of the last applied log entry, updated after every apply: lets readers
    /// wait for their own writes and watchers (tasks, event streams) wake on changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Waits until the entry at `index` has been applied here.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|a| *a >= index).await;
    }

    /// A read-only view that does not keep the database open (for long-lived holders,
    /// like connection handlers, that must not stop a restart from reopening it).
    pub fn reader(&self) -> StateReader {
        StateReader {
            data: self.data.clone(),
        }
    }

    /// Runs `f` on the current tables (a local read: the caller decides how fresh it
    /// must be, e.g. after `Raft::ensure_linearizable`).
    pub fn read<T>(&self, f: impl FnOnce(&Tables) -> T) -> T {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        f(&d.tables)
    }

    fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOT)?;
        match t.get("current")? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn save_snapshot(&self, s: &StoredSnapshot) -> Result<(), DbError> {
        let bytes = serde_json::to_vec(s)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SNAPSHOT)?;
            t.insert("current", bytes.as_slice())?;
        }
        Ok(tx.commit()?)
    }
}

/// [`apply_command`] for tests elsewhere in the crate, answered as Raft answers.
#[cfg(test)]
pub(crate) fn apply_for_test(tables: &mut Tables, cmd: &Command) -> crate::types::Applied {
    let (existed, conflict) = apply_command(tables, cmd);
    crate::types::Applied {
        index: 0,
        existed,
        conflict,
    }
}

/// Applies one command; returns whether the record existed, and the failed requirement
/// of a transaction (which then changed nothing).
fn apply_command(tables: &mut Tables, cmd: &Command) -> (bool, Option<Require>) {
    if let Command::Txn { require, ops } = cmd {
        if let Some(r) = require.iter().find(|r| !r.holds(tables)) {
            return (false, Some(r.clone()));
        }
        for op in ops {
            // Nested transactions are not part of the protocol; they are ignored.
            if !matches!(op, Command::Txn { .. }) {
                apply_one(tables, op);
            }
        }
        return (false, None);
    }
    (apply_one(tables, cmd), None)
}

fn apply_one(tables: &mut Tables, cmd: &Command) -> bool {
    match cmd {
        Command::Put { table, key, value } => tables
            .entry(table.clone())
            .or_default()
            .insert(key.clone(), value.clone())
            .is_some(),
        Command::Delete { table, key } => {
            tables.get_mut(table).and_then(|t| t.remove(key)).is_some()
        }
        Command::Txn { .. } => false,
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Copy under the lock (the tables are persistent maps: the copy is O(1)); encode
        // and store on a blocking thread: neither applying entries (the write lock) nor
        // the async workers wait for the whole state to be encoded and written.
        let copy = self.data.read().map_err(io_err)?.clone();
        let this = self.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || {
            let (last, membership) = (copy.last_applied, copy.membership.clone());
            let data = serde_json::to_vec(&copy)?;
            drop(copy);
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: membership,
                snapshot_id: format!("{}", last.map(|l| l.index).unwrap_or(0)),
            };
            this.save_snapshot(&StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            })?;
            Ok::<_, DbError>((meta, data))
        })
        .await
        .map_err(io_err)??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let d = self.data.read().map_err(io_err)?;
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut d = self.data.write().map_err(io_err)?;
        let mut out = Vec::new();
        for e in entries {
            d.last_applied = Some(e.log_id);
            let (existed, conflict) = match &e.payload {
                EntryPayload::Blank => (false, None),
                EntryPayload::Normal(cmd) => apply_command(&mut d.tables, cmd),
                EntryPayload::Membership(m) => {
                    d.membership = StoredMembership::new(Some(e.log_id), m.clone());
                    (false, None)
                }
            };
            out.push(Applied {
                index: e.log_id.index,
                existed,
                conflict,
            });
        }
        let last = d.last_applied.map(|l| l.index).unwrap_or(0);
        drop(d);
        self.applied.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let d: Data = serde_json::from_slice(&bytes).map_err(io_err)?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        })?;
        let last = d.last_applied.map(|l| l.index).unwrap_or(0);
        *self.data.write().map_err(io_err)? = d;
        self.applied.send_replace(last);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.load_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
