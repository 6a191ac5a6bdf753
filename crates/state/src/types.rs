//! The Raft type configuration and the commands the state machine applies.

use std::collections::BTreeMap;
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
}

/// What applying a command returned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Applied {
    /// The log index it was applied at.
    pub index: u64,
    /// Whether a record existed before.
    pub existed: bool,
}

/// The replicated state: tables of records.
pub type Tables = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

openraft::declare_raft_types!(
    /// Tessera's Raft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);
