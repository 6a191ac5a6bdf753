//! A store's exports as a forwarding node serves them, against a stand-in for `tesserad`
//! on its status socket: a forwarded client is never forwarded again, and the list of
//! exports holds the volumes held elsewhere. And the refusal of the forwarded flag by a
//! store older than it (a rolling upgrade), told apart from every other refusal.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use tessera_blockstore::{Store, StoreOptions};
use tessera_nbd::proto::Errno;
use tessera_nbd::{Exports, Peer};

use super::ExportDevice;
use crate::claim::ClusterAsk;
use crate::exports::StoreExports;

/// A `tesserad` that knows volume `v` (held here), `far` and its snapshot `far@s` (held
/// on node2 only), and counts the questions it was asked.
fn fake_tesserad(socket: &Path) -> Arc<AtomicU32> {
    let listener = UnixListener::bind(socket).unwrap();
    let asked = Arc::new(AtomicU32::new(0));
    let count = asked.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let q: serde_json::Value = serde_json::from_str(&line).unwrap();
            let reply = match q["op"].as_str() {
                Some("volume_exports") => serde_json::json!({"ok": {"exports": [
                    {"name": "v", "snapshot": false},
                    {"name": "far", "snapshot": false},
                    {"name": "far@s", "snapshot": true},
                ]}}),
                Some("volume_copies") => serde_json::json!({"ok": {
                    "message": "node1 holds no copy of volume far; its copies are on node2",
                    "targets": [{"node": "node2", "addr": "127.0.0.2:10809"}],
                }}),
                _ => serde_json::json!({"error": "unknown op"}),
            };
            let _ = writeln!(conn, "{reply}");
        }
    });
    asked
}

fn forwarding_store(dir: &Path) -> (StoreExports, Arc<AtomicU32>) {
    let store = Store::open(&dir.join("store"), StoreOptions::default()).unwrap();
    store.create_volume("v", 1 << 20).unwrap();
    let socket = dir.join("tesserad.sock");
    let asked = fake_tesserad(&socket);
    let exports = StoreExports::new(store)
        .with_cluster(Some(ClusterAsk::new(socket)))
        .with_forwarding(Some(dir.join("tls")));
    (exports, asked)
}

fn relayed() -> Peer {
    Peer::Other {
        name: "quic 127.0.0.2:4433".into(),
        relayed: true,
    }
}

#[test]
fn a_forwarded_client_is_never_forwarded_again() {
    let dir = tempfile::tempdir().unwrap();
    let (exports, asked) = forwarding_store(dir.path());
    let Err(e) = exports.open_for("far", &relayed()) else {
        panic!("a forwarded client's volume held elsewhere was opened");
    };
    assert_eq!(e.errno, Errno::Inval);
    assert!(
        e.message.contains("no copy of export far") && e.message.contains("not forwarded again"),
        "{}",
        e.message
    );
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "tesserad was asked where to forward a forwarded client"
    );
    // The same name from a client of this store's own: tesserad is asked where it is
    // and the client forwarded (not here, outside the store's runtime: refused, saying
    // where the copies are).
    let own = Peer::Other {
        name: "quic 127.0.0.9:4433".into(),
        relayed: false,
    };
    let Err(e) = exports.open_for("far", &own) else {
        panic!("forwarded without credentials");
    };
    assert!(
        e.message.contains("its copies are on node2"),
        "{}",
        e.message
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
}

#[test]
fn a_forwarded_client_of_a_volume_held_here_is_served_from_the_copy_here() {
    let dir = tempfile::tempdir().unwrap();
    let (exports, asked) = forwarding_store(dir.path());
    let d = exports.open_for("v", &relayed()).unwrap().unwrap();
    assert!(matches!(*d, ExportDevice::Local(_)));
    assert_eq!(asked.load(Ordering::SeqCst), 0);
}

#[test]
fn the_export_list_holds_the_volumes_held_elsewhere_once() {
    let dir = tempfile::tempdir().unwrap();
    let (exports, _) = forwarding_store(dir.path());
    let listed = exports.list();
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["v", "far", "far@s"]);
    assert_eq!(listed[0].description, "Tessera volume");
    assert!(listed[1].description.contains("no copy here"));
    assert!(listed[2].description.contains("snapshot"));
    // Without tesserad only the store's own are listed.
    let bare =
        StoreExports::new(Store::open(&dir.path().join("bare"), StoreOptions::default()).unwrap())
            .with_cluster(Some(ClusterAsk::new(dir.path().join("nobody.sock"))))
            .with_forwarding(Some(dir.path().join("tls")));
    assert!(bare.list().is_empty());
}

#[test]
fn an_older_stores_refusal_of_the_forwarded_flag_is_told_apart_from_other_refusals() {
    use tessera_volume_client::proto::{self, Kind, Request, FLAG_FORWARDED};
    use tessera_volume_client::{ClientError, ErrorCode};

    use super::{refused_the_flag, FLAG_UNKNOWN};

    let refusal = |code, message: &str| ClientError::Refused {
        code,
        message: message.into(),
    };
    // A store of before the flag: its decoder allowed only FUA, and answered bit 1 on
    // an Open with code 22 and the words its error's format made (the same format the
    // decoder uses today for the flag on a request that does not take it).
    assert_eq!(FLAG_UNKNOWN, "flags 0x02 are not valid on Open");
    let mut header = proto::encode_request(&Request {
        kind: Kind::Read,
        fua: false,
        forwarded: false,
        offset: 0,
        length: 512,
    });
    header[7] = FLAG_FORWARDED;
    let Err(bad) = proto::decode_request(&header) else {
        panic!("the forwarded flag was taken on a read");
    };
    assert_eq!(bad.code(), ErrorCode::Invalid);
    assert_eq!(bad.to_string().replace("Read", "Open"), FLAG_UNKNOWN);
    assert!(refused_the_flag(&refusal(ErrorCode::Invalid, FLAG_UNKNOWN)));

    // Not it: a store that knows the flag and holds no copy either, the same words
    // under another code, another flag, another refusal, a connection that failed.
    let again = super::not_forwarded_again("far");
    assert!(!refused_the_flag(&refusal(
        ErrorCode::Invalid,
        &again.message
    )));
    assert!(!refused_the_flag(&refusal(
        ErrorCode::NotSupported,
        FLAG_UNKNOWN
    )));
    assert!(!refused_the_flag(&refusal(
        ErrorCode::Invalid,
        "flags 0x04 are not valid on Open"
    )));
    assert!(!refused_the_flag(&refusal(
        ErrorCode::NotFound,
        "no volume or snapshot named far"
    )));
    assert!(!refused_the_flag(&ClientError::Connection(
        FLAG_UNKNOWN.into()
    )));
}
