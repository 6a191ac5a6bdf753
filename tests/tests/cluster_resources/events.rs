//! Events: recorded with the changes they describe, and streamed (SSE) from a given point.

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::api;
use tessera_tests::{sse, Lan};

/// The changes made so far are in `GET /events`; a stream from the latest event
/// delivers the creation of VM `streamed` (made here).
pub fn events_recorded_and_streamed(lan: &Lan, admin: &str) {
    let a = Some(admin);
    let post =
        |i: usize, path: &str, body: Value| api(lan, i, "POST", path, a, Some(&body.to_string()));

    // Events: recorded with the change, and streamed (SSE) from a given point.
    let (_, ev) = api(lan, 1, "GET", "events?limit=10000", a, None);
    let kinds: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "volume.create",
        "snapshot.create",
        "volume.clone",
        "vm.create",
        "vm.update",
        "vm.delete",
        "task.failed",
        "task.succeeded",
    ] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    let last = ev.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut curl = lan.command(2, Path::new("curl"));
    curl.args(["-H", &format!("Authorization: Bearer {admin}"), "--cacert"])
        .arg(lan.ca_file().unwrap())
        .arg(format!(
            "https://{}:8006/api/v1/events/stream?since={last}",
            Lan::addr(2)
        ));
    // The stream starts after `last`, so it has the VM's event whether curl connects
    // before or after the VM is made; it is read until that event came.
    let stream = std::thread::spawn(move || {
        sse::read_until(curl, 30, |events| {
            events.iter().any(|e| {
                let e: Value = serde_json::from_str(&e.data).unwrap_or_default();
                e["kind"] == "vm.create" && e["target"] == "streamed"
            })
        })
    });
    let (code, v) = post(
        0,
        "vms",
        json!({ "name": "streamed", "vcpus": 1, "memory_mib": 64 }),
    );
    assert_eq!(code, 201, "{v}");
    let read = stream.join().unwrap();
    assert_eq!(read.status, 200, "{read:?}");
    for e in &read.events {
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(e.event, "event", "{read:?}");
        assert_eq!(data["id"].as_str(), Some(e.id.as_str()), "{read:?}");
        assert!(
            e.id > last,
            "an event from before the stream's start: {read:?}"
        );
    }
}
