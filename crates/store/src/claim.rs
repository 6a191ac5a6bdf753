//! Exports from any node (issue #8): a client's first write to a replicated volume on a
//! store that holds a replica copy of it makes this store the volume's primary, by
//! asking the node's `tesserad` (its status socket, `<data_dir>/tesserad.sock`), which
//! moves the primary through the cluster state with a generation bump (the fence of the
//! previous primary) and answers once this store serves the volume as primary. For a
//! volume of which this store holds no copy `tesserad` says where its copies are: the
//! store forwards the client to one of them (`crate::forward`).
//!
//! The store never decides: `tesserad` refuses a move when a VM uses the volume or when
//! the copy here is not in sync, and the words of its refusal reach the client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// How long a move may take, the cluster's commit and this store's new role included
/// (`tesserad` gives up on the store after 20 s).
const MOVE_WAIT: Duration = Duration::from_secs(30);
/// How long the question where a volume's copies are may take.
const ASK_WAIT: Duration = Duration::from_secs(5);

/// The node's `tesserad`, as this store asks it.
#[derive(Clone, Debug)]
pub struct ClusterAsk {
    socket: PathBuf,
    /// One move asked at a time: the many connections and requests of one client (e.g.
    /// nbdcopy's) wait for the first one's move instead of each asking.
    moving: Arc<Mutex<()>>,
}

impl ClusterAsk {
    /// Asks the `tesserad` listening on `socket` (its `tesserad.sock`).
    pub fn new(socket: PathBuf) -> ClusterAsk {
        ClusterAsk {
            socket,
            moving: Arc::default(),
        }
    }

    /// Makes this node the primary of `volume` unless `serving` finds it is already:
    /// what `serving` gives once this store serves the volume as its primary, else the
    /// cluster's refusal in words. Blocking.
    pub fn take_primary<T>(
        &self,
        volume: &str,
        serving: impl Fn() -> Option<T>,
    ) -> Result<T, String> {
        let _one = self.moving.lock();
        if let Some(p) = serving() {
            return Ok(p);
        }
        let reply = self
            .call(
                serde_json::json!({"op": "take_primary", "volume": volume}),
                MOVE_WAIT,
            )
            .map_err(|e| {
                format!(
                    "cannot make this node the primary of volume {volume}: asking tesserad: {e}"
                )
            })?;
        let generation = match (reply["ok"]["generation"].as_u64(), reply["error"].as_str()) {
            (Some(g), _) => g,
            (None, Some(why)) => return Err(why.to_string()),
            (None, None) => return Err(unexpected(volume, &reply)),
        };
        tracing::info!(
            volume,
            generation,
            "became the volume's primary for an export client"
        );
        serving().ok_or_else(|| {
            format!("volume {volume}: the cluster made this node its primary (generation {generation}) but this store no longer serves it as such; try again")
        })
    }

    /// Where the copies of a volume that this store does not hold are (`None`: the
    /// cluster has no such volume, or `tesserad` did not answer).
    pub fn copies_elsewhere(&self, volume: &str) -> Option<CopiesElsewhere> {
        match self.call(
            serde_json::json!({"op": "volume_copies", "volume": volume}),
            ASK_WAIT,
        ) {
            Ok(reply) => {
                let ok = &reply["ok"];
                let message = ok["message"].as_str()?.to_string();
                let targets = ok["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| {
                        Some(Target {
                            node: t["node"].as_str()?.to_string(),
                            addr: t["addr"].as_str()?.to_string(),
                        })
                    })
                    .collect();
                let primary = ok["primary"].as_str().map(str::to_string);
                let in_sync = ok["in_sync"].as_array().map(|l| {
                    l.iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                });
                Some(CopiesElsewhere {
                    message,
                    targets,
                    primary,
                    in_sync,
                })
            }
            Err(e) => {
                tracing::debug!(volume, error = %e, "tesserad not asked where the volume's copies are");
                None
            }
        }
    }

    /// Every ready volume and snapshot of the cluster, as export names with whether each
    /// is a snapshot (`None`: `tesserad` did not answer, or the node is in no cluster).
    /// Blocking.
    pub fn exports(&self) -> Option<Vec<(String, bool)>> {
        match self.call(serde_json::json!({"op": "volume_exports"}), ASK_WAIT) {
            Ok(reply) => Some(
                reply["ok"]["exports"]
                    .as_array()?
                    .iter()
                    .filter_map(|e| {
                        Some((e["name"].as_str()?.to_string(), e["snapshot"].as_bool()?))
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::debug!(error = %e, "tesserad not asked which volumes the cluster has");
                None
            }
        }
    }

    /// Whether a client this store forwards to another node's may write `volume`: the
    /// cluster's refusal in words when a VM uses it. Blocking.
    pub fn may_write(&self, volume: &str) -> Result<(), String> {
        let reply = self
            .call(
                serde_json::json!({"op": "may_write", "volume": volume}),
                ASK_WAIT,
            )
            .map_err(|e| {
                format!("volume {volume}: cannot ask tesserad whether it may be written: {e}")
            })?;
        match (reply["ok"].is_object(), reply["error"].as_str()) {
            (true, _) => Ok(()),
            (false, Some(why)) => Err(why.to_string()),
            (false, None) => Err(format!(
                "volume {volume}: tesserad answered {reply} when asked whether it may be written"
            )),
        }
    }

    /// Whether a client of this store's own export, process `pid` when it came on the
    /// Unix socket, that gave writer key `key`, may write `volume`: while a VM uses it
    /// only that VM's VMM may (`crate::admission`). `Err` when `tesserad` could not be
    /// asked; else its answer, a refusal in words. Blocking.
    pub fn may_write_here(
        &self,
        volume: &str,
        pid: Option<u32>,
        key: Option<&str>,
    ) -> Result<Result<(), String>, String> {
        let reply = self
            .call(
                serde_json::json!({"op": "may_write_here", "volume": volume, "pid": pid, "key": key}),
                ASK_WAIT,
            )
            .map_err(|e| {
                format!("volume {volume}: cannot ask tesserad whether this client may write it: {e}; try again")
            })?;
        match (reply["ok"].is_object(), reply["error"].as_str()) {
            (true, _) => Ok(Ok(())),
            (false, Some(why)) => Ok(Err(why.to_string())),
            (false, None) => Err(format!(
                "volume {volume}: tesserad answered {reply} when asked whether this client may write it"
            )),
        }
    }

    /// One request line, one reply line.
    fn call(
        &self,
        request: serde_json::Value,
        wait: Duration,
    ) -> std::io::Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(wait))?;
        s.set_write_timeout(Some(ASK_WAIT))?;
        let mut line = request.to_string();
        line.push('\n');
        s.write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        serde_json::from_str(&reply)
            .map_err(|e| std::io::Error::other(format!("an answer that does not parse: {e}")))
    }
}

/// Where a volume this store holds no copy of is.
#[derive(Clone, Debug)]
pub struct CopiesElsewhere {
    /// In words, for a client that cannot be forwarded.
    pub message: String,
    /// The stores to forward a client to, the first to try first.
    pub targets: Vec<Target>,
    /// The primary's node, by name (`None` from a `tesserad` that does not say).
    pub primary: Option<String>,
    /// The nodes whose copies are in sync, by name (`None` from a `tesserad` that does
    /// not say).
    pub in_sync: Option<Vec<String>>,
}

/// A node whose store holds a copy.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its name, for messages.
    pub node: String,
    /// Its store's NBD address (`HOST:PORT`); its QUIC export is the same port over UDP.
    pub addr: String,
}

fn unexpected(volume: &str, reply: &serde_json::Value) -> String {
    format!("cannot make this node the primary of volume {volume}: tesserad answered {reply}")
}

/// Runs `f`, which blocks, from async code without stalling the runtime's other tasks
/// (NBD negotiation and the QUIC export open volumes on the async workers).
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
