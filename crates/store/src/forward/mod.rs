//! Exports from any node (issue #8) through a node that holds no copy of the volume: the
//! store serves the client by forwarding every request to another node's store, over
//! that store's QUIC volume export (`crate::export`, the client of
//! `tessera-volume-client`) with mutual TLS on this node's own certificate. No second
//! protocol: the forwarded connection is a client of the other store like any other, so
//! that store's rules hold unchanged — a write is acknowledged once the primary (and
//! every in-sync copy) has it, a flush once the primary's flush completed, the first
//! write through a replica's node makes it the primary, a client whose primary moved
//! away after it wrote is fenced.
//!
//! Where to: `tesserad` names the nodes (`crate::claim::ClusterAsk::copies_elsewhere`):
//! the primary's node first, then the other in-sync copies' (tried when the primary's
//! store does not answer), nodes known down last. Before a client's writes (again at
//! most every [`WRITE_CHECK_EVERY`]) the cluster is asked whether a VM uses the volume:
//! then the write is refused with the words a node holding a copy gives (the store the
//! client is forwarded to may be the VM's own, which cannot tell a client from the VMM).
//!
//! No loops: the forwarded connection says so when it opens the volume
//! (`FLAG_FORWARDED`), and a store never forwards such a client again ([`relayed`]): it
//! serves it from its own copy or refuses in words, and the forwarding store tries the
//! next node. NBD_OPT_LIST on any node lists every volume of the cluster
//! ([`list_elsewhere`]), the ones held elsewhere too.
//!
//! A broken connection is made again ([`link`]): a forwarded connection that breaks
//! (the other store restarted, or died: silent for [`IDLE`]) or a request that takes
//! longer than [`REQUEST_WAIT`] drops that connection; the next request asks `tesserad`
//! again where the copies are and connects anew (to the primary of the moment, or the
//! next in-sync copy's node), and a request whose connection broke under it is
//! sent once more. Only when that fails too does the client get EIO, with its words in
//! the log. A write whose reply did not come is not acknowledged. A request that took
//! longer than [`REQUEST_WAIT`] is not sent again ([`link::resend`]): EIO at once.
//!
//! A rolling upgrade: a store older than the forwarded flag refuses it in fixed words,
//! and the volume is opened there again without it ([`refused_the_flag`]).

mod device;
mod link;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tessera_nbd::proto::Errno;
use tessera_nbd::{DeviceError, ExportEntry, Peer};
use tessera_volume_client::{ClientError, Credentials, ErrorCode, Volume};
use tokio::runtime::Handle;

use crate::claim::{self, ClusterAsk, CopiesElsewhere};
pub use device::{ExportDevice, ForwardedDevice};

/// How long connecting to one node's export (and opening the volume there) may take
/// before the next node is tried.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// A forwarded connection that hears nothing from the other store (QUIC keep-alives
/// included) for this long fails: the bound on a client's wait when that store died.
pub const IDLE: Duration = Duration::from_secs(5);
/// The bound on one forwarded request: above the other store's longest legitimate wait
/// (its move of the primary, 30 s, after a role change, 15 s).
pub const REQUEST_WAIT: Duration = Duration::from_secs(60);
/// How often a writing client's volume is checked again for a VM using it.
pub const WRITE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// A store that did not answer is tried last for this long: a client's next
/// connections (nbdcopy opens several, NBD negotiation may open twice) do not each wait
/// [`CONNECT_WAIT`] for it.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// What a store forwards with: the node's credentials, and the stores that did not
/// answer lately.
#[derive(Clone, Debug)]
pub struct Forwarder {
    tls_dir: PathBuf,
    unreachable: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
}

impl Forwarder {
    /// Forwards with the node's credentials in `tls_dir` (`ca.crt`, `node.crt`,
    /// `node.key`, read at each open, so renewed ones are used).
    pub fn new(tls_dir: PathBuf) -> Forwarder {
        Forwarder {
            tls_dir,
            unreachable: Arc::default(),
        }
    }

    fn lately_unreachable(&self, addr: &SocketAddr) -> bool {
        self.unreachable
            .lock()
            .get(addr)
            .is_some_and(|t| t.elapsed() < UNREACHABLE_FOR)
    }
}

/// Opens export `name` (volume `volume` or one of its snapshots), which this store holds
/// no copy of, by connecting to the first of `copies`' nodes that answers (the ones that
/// did not answer lately last), with `forwarder`'s credentials. Blocking.
pub fn open(
    forwarder: Option<&Forwarder>,
    cluster: &ClusterAsk,
    name: &str,
    volume: &str,
    copies: CopiesElsewhere,
) -> Result<ForwardedDevice, DeviceError> {
    let cannot = |why: String| {
        tracing::warn!(export = name, reason = %why, "a client's volume cannot be forwarded");
        DeviceError::new(Errno::Inval, why)
    };
    let Some(forwarder) = forwarder else {
        return Err(cannot(format!(
            "not supported yet: {}; this store has no TLS credentials (--nbd-tls-dir) to forward the client with",
            copies.message
        )));
    };
    let Ok(rt) = Handle::try_current() else {
        return Err(cannot(format!(
            "not supported yet: {}; forwarding needs the store's runtime",
            copies.message
        )));
    };
    let creds = Credentials::from_dir(&forwarder.tls_dir)
        .map_err(|e| cannot(format!("{}; forwarding the client: {e}", copies.message)))?;
    // Each node is given CONNECT_WAIT in `connect`; this bound is only a backstop.
    let wait = CONNECT_WAIT * (copies.targets.len() as u32 + 1);
    let (f, export, targets) = (forwarder.clone(), name.to_string(), copies.targets.clone());
    let opened = run(&rt, wait, async move {
        connect(&f, &creds, &export, &targets).await
    });
    match opened {
        Some(Ok((v, via))) => {
            let first = link::Remote {
                volume: Arc::new(v),
                via,
            };
            Ok(ForwardedDevice {
                export: name.to_string(),
                volume: volume.to_string(),
                read_only: first.volume.read_only(),
                link: Arc::new(link::Link::new(
                    forwarder.clone(),
                    cluster.clone(),
                    name,
                    volume,
                    first,
                )),
                rt,
                cluster: cluster.clone(),
                write_checked: Mutex::new(None),
            })
        }
        Some(Err(tried)) => Err(cannot(format!(
            "{}; forwarding the client failed: {tried}",
            copies.message
        ))),
        None => Err(cannot(format!(
            "{}; forwarding the client failed: no node answered within {wait:?}",
            copies.message
        ))),
    }
}

/// Connects to the first of `targets` whose store opens export `name` for this store's
/// client (the ones that did not answer lately last, each given [`CONNECT_WAIT`]): the
/// volume and that node's name, or what each node said.
async fn connect(
    forwarder: &Forwarder,
    creds: &Credentials,
    name: &str,
    targets: &[claim::Target],
) -> Result<(Volume, String), String> {
    let mut tried = Vec::new();
    let mut addrs = Vec::new();
    for t in targets {
        match t.addr.parse::<SocketAddr>() {
            Ok(a) => addrs.push((t, a)),
            Err(e) => tried.push(format!("node {} ({}): not an address: {e}", t.node, t.addr)),
        }
    }
    // A stable sort: the cluster's order among the stores that answered lately.
    addrs.sort_by_key(|(_, a)| forwarder.lately_unreachable(a));
    for (t, addr) in addrs {
        let server_name = addr.ip().to_string();
        let mut opened = tokio::time::timeout(
            CONNECT_WAIT,
            Volume::open_forwarding(addr, &server_name, creds, name, IDLE),
        )
        .await;
        if let Ok(Err(e)) = &opened {
            if refused_the_flag(e) {
                // A rolling upgrade: that store serves the volume as it did before the
                // flag existed (from its copy, which tesserad says it holds).
                tracing::info!(export = name, node = %t.node, %addr,
                    "that node's store is older than the forwarded flag; opening the volume there without it");
                opened = tokio::time::timeout(
                    CONNECT_WAIT,
                    Volume::open_with_idle_timeout(addr, &server_name, creds, name, IDLE),
                )
                .await;
            }
        }
        match opened {
            Ok(Ok(v)) => {
                forwarder.unreachable.lock().remove(&addr);
                tracing::info!(export = name, node = %t.node, %addr,
                    "forwarding a client's volume to another node's store (this node holds no copy)");
                return Ok((v, t.node.clone()));
            }
            Ok(Err(e @ ClientError::Refused { .. })) => {
                tried.push(format!("node {} ({addr}): {e}", t.node))
            }
            Ok(Err(e)) => {
                forwarder.unreachable.lock().insert(addr, Instant::now());
                tried.push(format!("node {} ({addr}): {e}", t.node))
            }
            Err(_) => {
                forwarder.unreachable.lock().insert(addr, Instant::now());
                tried.push(format!(
                    "node {} ({addr}): no answer within {CONNECT_WAIT:?}",
                    t.node
                ))
            }
        }
    }
    if tried.is_empty() {
        tried.push("no node's store to forward to".into());
    }
    Err(tried.join("; "))
}

/// The words of a store older than the `forwarded` Open flag (`FLAG_FORWARDED`, bit 1):
/// its decoder knew only FUA, so it refuses the flag as invalid (code 22) with exactly
/// these words, fixed in the stores already deployed. A store that knows the flag never
/// sends them for an `Open`, and its other code-22 refusals (a forwarded client it holds
/// no copy for) are not these.
const FLAG_UNKNOWN: &str = "flags 0x02 are not valid on Open";

/// Whether `e` is an older store's refusal of the `forwarded` flag: then the volume is
/// opened there again without it, so forwarding goes on during a rolling upgrade. Such a
/// store either predates forwarding (it serves from its copy or refuses) or forwards
/// without the flag (0f286cf to 94050e0): it serves from the copy `tesserad` says it
/// holds, and forwards on only when that view was stale, as every store did before the
/// flag; the loop the flag rules out needs two such stores and a stale view.
fn refused_the_flag(e: &ClientError) -> bool {
    matches!(e, ClientError::Refused { code: ErrorCode::Invalid, message } if message == FLAG_UNKNOWN)
}

/// Adds to `listed` (this store's own exports) every volume and snapshot of the cluster
/// this store holds no copy of, which it serves by forwarding: a client listing any
/// node's exports sees every volume, named as on the nodes that hold it. When `tesserad`
/// does not answer, only this store's own are listed. Blocking.
pub fn list_elsewhere(cluster: &ClusterAsk, listed: &mut Vec<ExportEntry>) {
    let Some(all) = claim::blocking(|| cluster.exports()) else {
        return;
    };
    let here: HashSet<String> = listed.iter().map(|e| e.name.clone()).collect();
    for (name, snapshot) in all {
        if here.contains(&name) {
            continue;
        }
        let description = if snapshot {
            "Tessera snapshot (read-only), served from another node: no copy here"
        } else {
            "Tessera volume, served from another node: no copy here"
        };
        listed.push(ExportEntry {
            name,
            description: description.into(),
        });
    }
}

/// Whether `peer` is another store forwarding its own client: served from a copy here
/// or refused ([`not_forwarded_again`]), never forwarded on.
pub fn relayed(peer: &Peer) -> bool {
    matches!(peer, Peer::Other { relayed: true, .. })
}

/// The refusal of a forwarded client asking for export `name`, of which this store holds
/// no copy either. The store that forwarded it then tries the next node holding a copy.
pub fn not_forwarded_again(name: &str) -> DeviceError {
    let why = format!(
        "this store holds no copy of export {name}, and the client was forwarded here by another node's store: a forwarded client is not forwarded again (that store's list of the copies was out of date)"
    );
    tracing::warn!(
        export = name,
        "a forwarded client asked for a volume this store holds no copy of; refused"
    );
    DeviceError::new(Errno::Inval, why)
}

/// Runs `fut` on the store's runtime `rt` and waits for it from this thread (moved off
/// the async workers while it waits), at most `wait`: `None` when it took longer (then
/// it is abandoned). Safe from any thread: nothing here blocks a worker the future needs.
fn run<T: Send + 'static>(
    rt: &Handle,
    wait: Duration,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let task = rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    let got = claim::blocking(|| rx.recv_timeout(wait)).ok();
    if got.is_none() {
        task.abort();
    }
    got
}

/// The errno of the other store's error code: the client sees what a client of that
/// store would.
fn errno_of(code: ErrorCode) -> Errno {
    match code {
        ErrorCode::NotPermitted => Errno::Perm,
        ErrorCode::NotFound | ErrorCode::Invalid => Errno::Inval,
        ErrorCode::NoSpace => Errno::NoSpc,
        ErrorCode::TooLarge => Errno::Overflow,
        ErrorCode::NotSupported => Errno::NotSup,
        ErrorCode::Shutdown => Errno::Shutdown,
        ErrorCode::Io => Errno::Io,
    }
}

/// A forwarded request's failure, in words (logged: NBD carries only the errno).
fn failed(export: &str, via: &str, e: Option<ClientError>) -> DeviceError {
    let err = match e {
        Some(ClientError::Refused { code, message }) => DeviceError::new(
            errno_of(code),
            format!("{message} (node {via}'s store, which this node forwards export {export} to)"),
        ),
        Some(e) => DeviceError::new(
            Errno::Io,
            format!("export {export}: forwarding to node {via}'s store failed: {e}; the next request connects anew"),
        ),
        None => DeviceError::new(
            Errno::Io,
            format!("export {export}: node {via}'s store did not answer within {REQUEST_WAIT:?}; the request is not sent again (that store may still carry it out: a write's outcome is unknown), the next one connects anew"),
        ),
    };
    tracing::warn!(export, node = via, reason = %err.message, "a forwarded request failed");
    err
}

#[cfg(test)]
mod tests;
