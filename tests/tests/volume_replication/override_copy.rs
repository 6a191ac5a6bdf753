//! The operator override: a 2-copy volume whose only replica's store dies stalls until
//! an administrator lets its primary go on alone; the copy comes back and the override
//! is cleared.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::helpers::{
    all_in_sync, call, cli, copy_state, id_of, kill, nbd_size, payload, random_past, read_hash,
    unix_uri, wait_task, wait_volume, write, Restarted, MIB, SIZE,
};

/// A 2-copy volume whose replica's store dies: its writes stall (removing the copy would
/// leave 1 in sync); `tessera volume override` lets the primary go on alone (recorded
/// with who, event `volume.override`); the store comes back: the copy is caught up, in
/// sync again, and the override is cleared.
pub(crate) fn operator_override(
    ca: &str,
    t: &str,
    home: &Path,
    dir: &Path,
    tmp: &Path,
    restarted: &mut Restarted,
) {
    let (c, task) = call(
        ca,
        2,
        "POST",
        "volumes",
        Some(t),
        Some(&json!({"name": "c", "size_bytes": SIZE, "replicas": 2, "node": id_of(ca, t, 1)})),
    );
    assert_eq!(c, 202, "{task}");
    assert_eq!(wait_task(ca, 2, t, &task)["state"], "succeeded");
    let v = wait_volume(ca, 2, t, "c", 30, |v| {
        v["state"] == "ready" && all_in_sync(v)
    });
    let replica = v["replication"]["copies"][1]["node"]
        .as_str()
        .unwrap()
        .to_string();
    let r = (1..=3u8).find(|i| id_of(ca, t, *i) == replica).unwrap();
    let (fc1, hc1) = payload(tmp, "c1", 8 * MIB);
    assert!(write(dir, 1, "c", &fc1));
    // A reason of spaces only, or with a control character (a second line), is refused
    // (as the schema's pattern says), nothing changed.
    for reason in [" ", "\u{3000}", "two\nlines", "a\u{85}b"] {
        let (code, e) = call(
            ca,
            2,
            "POST",
            "volumes/c/override",
            Some(t),
            Some(&json!({ "reason": reason })),
        );
        assert_eq!(code, 400, "{reason:?}: {e}");
        assert!(e["error"].as_str().unwrap().contains("reason"), "{e}");
    }

    let store = kill(dir, r, &["tessera-store"]);
    let (fc2, hc2) = payload(tmp, "c2", 8 * MIB);
    let mut writer = Command::new("nbdcopy")
        .arg("--flush")
        .arg(&fc2)
        .arg(unix_uri(dir, 1, "c"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stalled: the cluster says so, and the write has not completed.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, ev) = call(ca, 2, "GET", "events", Some(t), None);
        let stalled = ev.as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["kind"] == "volume.replication_stalled" && e["target"] == "c")
        });
        if stalled {
            break;
        }
        assert!(Instant::now() < deadline, "no stall of c announced: {ev}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the write to c completed with its only replica's store dead"
    );
    let before = wait_volume(ca, 2, t, "c", 1, |_| true);
    assert_eq!(copy_state(&before, &replica), "in_sync", "{before}");

    let (ok, out, err) = cli(
        home,
        &[
            "volume",
            "override",
            "c",
            "--reason",
            "node store under repair",
        ],
        "",
    );
    assert!(ok, "volume override: {out} {err}");
    assert!(out.contains("1 of 2 copies in sync"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = writer.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the write to c never completed after the override"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "nbdcopy to c failed after the override");
    let v = wait_volume(ca, 2, t, "c", 1, |_| true);
    assert_eq!(v["operator_override"]["by"], "admin", "{v}");
    assert_eq!(copy_state(&v, &replica), "out_of_sync", "{v}");
    assert!(
        v["replication"]["generation"].as_u64() > before["replication"]["generation"].as_u64(),
        "{v}"
    );
    assert_eq!(read_hash(dir, 1, "c", tmp), hc2);

    // Grown while its other copy is out of sync (`tessera volume resize`): the primary
    // grows alone, and a write past the old end completes.
    let big = SIZE + 16 * MIB;
    let (ok, out, err) = cli(home, &["volume", "resize", "c", "--size", "48M"], "");
    assert!(ok, "volume resize: {out} {err}");
    wait_volume(ca, 2, t, "c", 30, |v| v["size_bytes"] == big);
    assert_eq!(nbd_size(dir, 1, "c"), big);
    let (fc3, hc3) = random_past(dir, 1, "c", tmp, SIZE);
    assert!(write(dir, 1, "c", &fc3), "a write past c's old end");

    // The store comes back: caught up (grown first), in sync, the override cleared; both
    // copies equal, at the new size.
    restarted.start(dir, r, &store[0]);
    let v = wait_volume(ca, 2, t, "c", 60, |v| {
        all_in_sync(v) && v.get("operator_override").is_none()
    });
    assert_eq!(v["replication"]["primary"], id_of(ca, t, 1).as_str(), "{v}");
    for i in [1, r] {
        assert_eq!(nbd_size(dir, i, "c"), big, "c's size on node{i}");
        assert_eq!(read_hash(dir, i, "c", tmp), hc3, "c on node{i}");
    }
    assert_ne!(hc1, hc2);
    let (_, ev) = call(ca, 2, "GET", "events", Some(t), None);
    let text = ev.to_string();
    for kind in [
        "volume.override",
        "node store under repair",
        "volume.override_cleared",
    ] {
        assert!(text.contains(kind), "no {kind}: {text}");
    }
}
