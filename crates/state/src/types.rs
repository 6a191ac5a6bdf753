//! The Raft type configuration and the commands the state machine applies.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// A change to the cluster state. Tables hold typed records as JSON (nodes, volumes, VMs,
/// users...); the domain crates own the record types.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Insert or replace a record.
    Put {
        /// Table name.
        table: String,
        /// Record key.
        key: String,
        /// Record.
        value: serde_json::Value,
    },
    /// Remove a record.
    Delete {
        /// Table name.
        table: String,
        /// Record key.
        key: String,
    },
    /// Several changes applied together, or none of them: each requirement must hold
    /// first (so a create never overwrites and a change never lands half-way).
    Txn {
        /// What must be true before anything changes.
        require: Vec<Require>,
        /// The changes (Put and Delete only).
        ops: Vec<Command>,
    },
}

/// A precondition of a [`Command::Txn`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Require {
    /// Table name.
    pub table: String,
    /// Record key.
    pub key: String,
    /// Whether the record must exist (true) or be absent (false).
    pub exists: bool,
    /// When given (with `exists`), the record must equal this value (compare-and-swap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
}

impl Require {
    /// The record must exist.
    pub fn exists(table: &str, key: &str) -> Require {
        Require {
            table: table.into(),
            key: key.into(),
            exists: true,
            equals: None,
        }
    }

    /// The record must be absent.
    pub fn absent(table: &str, key: &str) -> Require {
        Require {
            table: table.into(),
            key: key.into(),
            exists: false,
            equals: None,
        }
    }

    /// The record must exist and equal `value`.
    pub fn equals(table: &str, key: &str, value: serde_json::Value) -> Require {
        Require {
            table: table.into(),
            key: key.into(),
            exists: true,
            equals: Some(value),
        }
    }

    /// Whether it holds in `tables`.
    pub fn holds(&self, tables: &Tables) -> bool {
        let rec = tables.get(&self.table).and_then(|t| t.get(&self.key));
        match (rec, self.exists, &self.equals) {
            (None, exists, _) => !exists,
            (Some(_), false, _) => false,
            (Some(_), true, None) => true,
            (Some(v), true, Some(want)) => v == want,
        }
    }
}

/// What applying a command returned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Applied {
    /// The log index it was applied at.
    pub index: u64,
    /// Whether a record existed before.
    pub existed: bool,
    /// For a [`Command::Txn`] whose requirement failed: which, and nothing was changed.
    #[serde(default)]
    pub conflict: Option<Require>,
}

/// The replicated state: tables of records, as persistent maps: a copy (for a snapshot)
/// costs nothing and shares everything unchanged, so taking one never stalls applying.
pub type Tables = imbl::OrdMap<String, imbl::OrdMap<String, serde_json::Value>>;

openraft::declare_raft_types!(
    /// Tessera's Raft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);
