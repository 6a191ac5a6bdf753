//! The local database (redb) holding the Raft log, vote and snapshots: opening it,
//! creating it atomically, and its error type.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use redb::Database;
use tokio::sync::oneshot;

use crate::log_store::LogStore;
use crate::state_machine::StateMachine;

/// redb's page cache (its default, 1 GiB, would let a node's memory grow with the
/// snapshots and log it writes; the state machine itself lives in memory anyway).
const CACHE_BYTES: usize = 32 << 20;

/// A failure of the local database, or of encoding what it holds.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// redb failed (boxed: redb's error is large, and this one travels up every call).
    #[error(transparent)]
    Redb(Box<redb::Error>),
    /// A record (log entry, vote, snapshot) does not encode or decode.
    #[error("stored data: {0}")]
    Encoding(#[from] serde_json::Error),
    /// The file system failed around the database (creating, syncing, renaming).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// redb's operations have an error type each; all of them are a [`redb::Error`].
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// openraft's storage traits fix their error type; this is where ours becomes it (as a
/// write error, whatever the operation: openraft stops on any storage error).
impl From<DbError> for openraft::StorageError<u64> {
    fn from(e: DbError) -> Self {
        openraft::StorageIOError::<u64>::write(&e).into()
    }
}

/// The open database, shared by the log store and the state machine, telling when it is
/// closed: its holders include openraft's background tasks, which outlive
/// `Raft::shutdown`, and redb writes its allocator state when the database is dropped,
/// with the file still locked. A restart must wait for the end of that drop, not for the
/// last reference to go.
pub struct Db {
    db: Database,
    /// Declared after `db`, so dropped after it: its receiver hears only once the
    /// database is closed and its lock released.
    _closed: oneshot::Sender<()>,
}

/// Fires (with an error: the sender is gone) once the database is closed.
pub type Closed = oneshot::Receiver<()>;

impl Db {
    /// Wraps an open database.
    pub fn new(db: Database) -> (Arc<Db>, Closed) {
        let (tx, rx) = oneshot::channel();
        (Arc::new(Db { db, _closed: tx }), rx)
    }
}

impl Deref for Db {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.db
    }
}

/// Opens `dir/state.redb`, creating it (atomically) on first use.
pub(crate) fn open(dir: &Path) -> Result<(Arc<Db>, Closed), DbError> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("state.redb");
    if !path.exists() {
        create_atomically(dir, &path)?;
    }
    Ok(Db::new(
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)?,
    ))
}

/// Creates the database under a temporary name and renames it into place, so a crash
/// during creation never leaves a half-written database where a restart would find it.
fn create_atomically(dir: &Path, path: &Path) -> Result<(), DbError> {
    let tmp = dir.join("state.redb.new");
    let _ = std::fs::remove_file(&tmp);
    {
        let (db, _) = Db::new(Database::create(&tmp)?);
        LogStore::new(db.clone())?;
        StateMachine::new(db)?;
    }
    std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    Ok(())
}
