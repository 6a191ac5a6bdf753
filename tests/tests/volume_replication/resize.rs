//! Growing a replicated volume (issue #8): the resize goes through the primary's write
//! stream, so every copy grows before any write past the old end reaches it. Here the
//! three in-sync copies of `a`; a copy out of sync that grows when it is caught up is in
//! `override_copy` (volume `c`).

use std::process::Command;

use serde_json::{json, Value};
use tessera_tests::output;

use super::helpers::{
    all_in_sync, call, nbd_size, random_past, read_hash, unix_uri, wait_task, wait_volume, write,
    Cx, MIB, SIZE,
};

pub(crate) fn three_copies_grow_together(cx: &Cx) {
    let (ca, t, dir, tmp) = (
        cx.ca.as_str(),
        cx.t.as_str(),
        cx.dir.as_path(),
        cx.tmp.as_path(),
    );
    let big = SIZE + 16 * MIB;
    // Smaller is refused, as for a one-copy volume.
    let (c, e) = call(
        ca,
        2,
        "POST",
        "volumes/a/resize",
        Some(t),
        Some(&json!({"size_bytes": SIZE - 4096})),
    );
    assert_eq!(c, 409, "{e}");
    let (c, task) = call(
        ca,
        2,
        "POST",
        "volumes/a/resize",
        Some(t),
        Some(&json!({"size_bytes": big})),
    );
    assert_eq!(c, 202, "{task}");
    let done = wait_task(ca, 2, t, &task);
    assert_eq!(done["state"], "succeeded", "{done}");
    let v = wait_volume(ca, 2, t, "a", 10, |v| v["size_bytes"] == big);
    assert!(all_in_sync(&v), "a resize changes no copy's state: {v}");
    // Every copy's own store serves the new size; qemu-img sees it through the primary.
    for i in 1..=3 {
        assert_eq!(nbd_size(dir, i, "a"), big, "a's size on node{i}");
    }
    let out = output(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(unix_uri(dir, 1, "a")),
    );
    assert!(
        out.status.success(),
        "qemu-img info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], big, "{info}");
    // Written through the primary up to the new end: every copy has it.
    let (f, h) = random_past(dir, 1, "a", tmp, SIZE);
    assert!(write(dir, 1, "a", &f), "a write past a's old end");
    for i in 1..=3 {
        assert_eq!(
            read_hash(dir, i, "a", tmp),
            h,
            "a on node{i} after the resize"
        );
    }
}
