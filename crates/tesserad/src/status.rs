//! The local status socket, `<data_dir>/tesserad.sock` (mode 0600, so root only): one
//! JSON request per line, `{"op":"status"}`, answered with what this node knows about
//! itself, the cluster, its peers' health, its metrics and its store's health.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tessera_cluster::identity::NodeId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::{health, metrics, replicated, storage, Heard, SharedNode};

/// A request line longer than this ends the connection.
const MAX_REQUEST: u64 = 64 * 1024;

/// What the status document is made of.
#[derive(Clone)]
pub(crate) struct Sources {
    pub me: NodeId,
    pub cluster_id: Arc<Mutex<Option<String>>>,
    pub node: SharedNode,
    pub heard: Heard,
    pub metrics: metrics::Metrics,
    pub storage: Arc<storage::Health>,
}

/// Binds the socket and serves it in the background.
pub(crate) fn serve(dir: &Path, sources: Sources) -> anyhow::Result<()> {
    let path = dir.join("tesserad.sock");
    // A socket left by an earlier run would make the bind fail.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer(sock, sources.clone(), dir.clone()));
        }
    });
    Ok(())
}

/// Answers the requests of one connection, one line each.
async fn answer(sock: UnixStream, sources: Sources, data_dir: std::path::PathBuf) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r.take(MAX_REQUEST));
    let mut line = String::new();
    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
        let reply = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) if v["op"] == "status" => serde_json::json!({ "ok": document(&sources) }),
            Ok(v)
                if v["op"] == "take_primary"
                    || v["op"] == "volume_copies"
                    || v["op"] == "may_write" =>
            {
                store_question(&sources, &v).await
            }
            Ok(v) if v["op"] == "may_write_here" => writer_question(&sources, &v, &data_dir),
            Ok(v) if v["op"] == "volume_exports" => exports_question(&sources),
            Ok(v) => serde_json::json!({ "error": format!("unknown op {}", v["op"]) }),
            Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
        };
        let mut out = reply.to_string().into_bytes();
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
        line.clear();
    }
}

/// What this node's store asks about a volume a client opened there (`tessera-store
/// --tesserad-socket`): `take_primary` makes this node the primary of a replicated
/// volume (answered once the store serves it so, with the generation), `volume_copies`
/// says where the copies of a volume the store does not hold are and where to forward its
/// client, `may_write` whether such a forwarded client may write it (no VM uses it)
/// (`crate::replication::takeover`).
async fn store_question(s: &Sources, v: &serde_json::Value) -> serde_json::Value {
    use crate::replication::takeover;
    let Some(volume) = v["volume"].as_str() else {
        return serde_json::json!({ "error": "a volume name is needed" });
    };
    let n = s.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(n) = n else {
        return serde_json::json!({ "error": "this node is not in a cluster yet; try again" });
    };
    if v["op"] == "volume_copies" {
        return serde_json::json!({ "ok": takeover::copies_elsewhere(&n, &s.me.0, volume) });
    }
    if v["op"] == "may_write" {
        return match takeover::may_write(&n, &s.me.0, volume) {
            Ok(()) => serde_json::json!({ "ok": {} }),
            Err(why) => serde_json::json!({ "error": why }),
        };
    }
    match takeover::take_primary(&n, &s.me.0, volume).await {
        Ok(generation) => serde_json::json!({ "ok": { "generation": generation } }),
        Err(why) => serde_json::json!({ "error": why }),
    }
}

/// What this node's store asks when a client lists its exports (`volume_exports`):
/// every ready volume and snapshot of the cluster, since it serves those it holds no
/// copy of by forwarding (`crate::replication::takeover::exports`).
fn exports_question(s: &Sources) -> serde_json::Value {
    let n = s.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match n {
        Some(n) => serde_json::json!({ "ok": crate::replication::takeover::exports(&n) }),
        None => serde_json::json!({ "error": "this node is not in a cluster yet; try again" }),
    }
}

/// What this node's store asks at the first write of a client of its own exports, and
/// again every half second while it writes (`may_write_here`, with the client's `pid`
/// when it came on the Unix socket and the writer `key` it gave): while a VM uses the
/// volume only that VM's VMM may write (`crate::replication::takeover::may_write_here`).
/// A node not in a cluster runs no VM: nothing to guard.
fn writer_question(s: &Sources, v: &serde_json::Value, data_dir: &Path) -> serde_json::Value {
    use crate::replication::takeover::WriterId;
    use crate::vmrun::supervisor;
    let Some(volume) = v["volume"].as_str() else {
        return serde_json::json!({ "error": "a volume name is needed" });
    };
    let who = WriterId {
        pid: v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
        key: v["key"].as_str(),
    };
    let n = s.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(n) = n else {
        return serde_json::json!({ "ok": {} });
    };
    // The VMM of a VM this node runs, from its run.json; only a live tessera-vmm counts
    // (a pid left by an ended VMM may have been taken by another program).
    let vmm_of = |vm: &str| {
        supervisor::find_running(
            &supervisor::RunDir::new(data_dir, vm),
            &supervisor::Exits::default(),
        )
        .map(|info| info.pid)
    };
    let ask = || crate::replication::takeover::may_write_here(&n, &s.me.0, volume, who, &vmm_of);
    let mut answer = ask();
    // A VMM's key is committed before it starts, but this node's copy of the cluster
    // state may not hold it yet: refused with a key, asked again on the latest state.
    if answer.is_err() && who.key.is_some() {
        // This answer is synchronous: a worker of tesserad's multi-threaded runtime waits.
        let synced = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| h.block_on(n.sync()).is_ok())
            }
            _ => false,
        };
        if synced {
            answer = ask();
        }
    }
    match answer {
        Ok(()) => serde_json::json!({ "ok": {} }),
        Err(why) => serde_json::json!({ "error": why }),
    }
}

/// The status document: identity and Raft view, peers' health, metrics.
fn document(s: &Sources) -> serde_json::Value {
    let cid = s
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let n = s.node.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut st = replicated::status(&s.me, cid.as_deref(), n.as_deref());
    let heard = s.heard.lock().unwrap_or_else(|p| p.into_inner()).clone();
    st["health"] = health::report(&s.me.0, &st["nodes"], &heard);
    st["metrics"] = s.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
    st["storage"] = serde_json::json!(s.storage.latest());
    st
}
