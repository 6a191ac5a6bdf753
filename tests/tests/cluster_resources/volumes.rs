//! Volumes, snapshots and clones made by tasks on the owning node, checked over NBD with
//! nbdinfo and qemu-io; bad input refused with nothing made; a failed task says why and
//! undoes its reservation.

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task, ClusterNode};
use tessera_tests::{bin, output, Lan};

use super::accepted_task;

/// A volume on node 3's store made through node 1 and read on node 2, snapshotted,
/// cloned; bad input and a failing task. Leaves volumes `data` (with snapshot `s1`) and
/// `copy` (its clone), and NBD credentials in `creds`.
pub fn volumes_snapshots_and_clones(
    lan: &Lan,
    nodes: &[ClusterNode],
    admin: &str,
    ids: &[String],
    creds: &Path,
) {
    let a = Some(admin);
    let post =
        |i: usize, path: &str, body: Value| api(lan, i, "POST", path, a, Some(&body.to_string()));

    // A volume on node 3's store, asked for on node 1, read back on node 2.
    let id = accepted_task(post(
        0,
        "volumes",
        json!({ "name": "data", "size_bytes": 64 << 20, "node": ids[2], "replicas": 1 }),
    ));
    let t = wait_task(lan, 1, admin, &id);
    assert_eq!(t["state"], "succeeded", "{t}\n{}", nodes[2].logs());
    assert_eq!(t["progress"], 100);
    assert_eq!(t["node"], ids[2].as_str());
    assert!(t["log"].as_array().unwrap().len() >= 3, "{t}");
    let (code, v) = api(lan, 1, "GET", "volumes/data", a, None);
    assert_eq!(code, 200);
    assert_eq!(v["state"], "ready");
    assert_eq!(
        v["nbd"],
        format!("nbds://{}:10809/data", Lan::addr(2)).as_str()
    );
    nbd_creds(lan, admin, creds);
    let uri = format!(
        "nbds://{}:10809/data?tls-certificates={}",
        Lan::addr(2),
        creds.display()
    );
    let info = wait_for("node 3's store to serve NBD over TLS", 20, || {
        let info = output(lan.command(0, Path::new("nbdinfo")).args(["--size", &uri]));
        info.status.success().then_some(info)
    });
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "67108864");

    // Snapshot, then overwrite, then clone the snapshot: the clone has the old data.
    assert!(qemu_io(lan, 0, "write -P 0xa5 0 1M", creds, 2, "data")
        .status
        .success());
    let id = accepted_task(post(1, "volumes/data/snapshots", json!({ "name": "s1" })));
    assert_eq!(wait_task(lan, 0, admin, &id)["state"], "succeeded");
    assert!(qemu_io(lan, 0, "write -P 0x5a 0 1M", creds, 2, "data")
        .status
        .success());
    let id = accepted_task(post(
        2,
        "volumes/data/clone",
        json!({ "snapshot": "s1", "name": "copy" }),
    ));
    assert_eq!(wait_task(lan, 2, admin, &id)["state"], "succeeded");
    let r = qemu_io(lan, 1, "read -P 0xa5 0 1M", creds, 2, "copy");
    assert!(
        r.status.success()
            && !String::from_utf8_lossy(&r.stdout).contains("Pattern verification failed"),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );
    let list = exports(lan, 0, 2, creds);
    assert!(
        list.contains("export=\"data@s1\"") && list.contains("export=\"copy\""),
        "{list}"
    );
    let (_, v) = api(lan, 0, "GET", "volumes/copy", a, None);
    assert_eq!(v["origin"], "data@s1");
    let (_, v) = api(lan, 0, "GET", "volumes/data", a, None);
    assert_eq!(v["snapshots"][0]["name"], "s1");

    // Bad input: 400 naming the field; duplicates 409; nothing is created.
    for (body, field) in [
        (json!({ "name": "odd", "size_bytes": 1000 }), "size_bytes"),
        (
            json!({ "name": "odd", "size_bytes": 1u64 << 47 }),
            "size_bytes",
        ),
        (json!({ "name": "odd", "size_bytes": "big" }), "size_bytes"),
        (json!({ "name": "Bad/Name", "size_bytes": 4096 }), "name"),
        (
            json!({ "name": "odd", "size_bytes": 4096, "colour": 1 }),
            "colour",
        ),
    ] {
        let (code, v) = post(0, "volumes", body.clone());
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(field), "{body}: {v}");
    }
    // A well-formed request naming a node the cluster lacks: 404 naming the field.
    let (code, v) = post(
        0,
        "volumes",
        json!({ "name": "odd", "size_bytes": 4096, "node": "nope" }),
    );
    assert_eq!(code, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("node"), "{v}");
    let (code, v) = post(1, "volumes", json!({ "name": "data", "size_bytes": 4096 }));
    assert_eq!(code, 409, "{v}");
    assert_eq!(api(lan, 0, "GET", "volumes/odd", a, None).0, 404);

    // A task that fails says why, and its reservation is undone: the store already has
    // a volume of that name that the cluster does not know.
    let made = output(
        std::process::Command::new(bin("tessera-store"))
            .arg("--admin-socket")
            .arg(nodes[0].dir.join("store/admin.sock"))
            .args(["volume", "create", "rogue", "--size", "1M"]),
    );
    assert!(made.status.success());
    let id = accepted_task(post(
        1,
        "volumes",
        json!({ "name": "rogue", "size_bytes": 1 << 20, "node": ids[0], "replicas": 1 }),
    ));
    let t = wait_task(lan, 1, admin, &id);
    assert_eq!(t["state"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("exists"), "{t}");
    assert!(t["log"].to_string().contains("failed"), "{t}");
    assert_eq!(api(lan, 2, "GET", "volumes/rogue", a, None).0, 404);
}

/// NBD client credentials from `POST /nbd/credentials`, in the directory layout qemu and
/// libnbd read (TCP NBD serves only TLS clients with a certificate of the cluster CA).
pub fn nbd_creds(lan: &Lan, token: &str, dir: &Path) {
    let (code, v) = api(lan, 0, "POST", "nbd/credentials", Some(token), None);
    assert_eq!(code, 200, "{v}");
    std::fs::create_dir_all(dir).unwrap();
    for (file, field) in [
        ("ca-cert.pem", "ca_cert_pem"),
        ("client-cert.pem", "client_cert_pem"),
        ("client-key.pem", "client_key_pem"),
    ] {
        std::fs::write(dir.join(file), v[field].as_str().unwrap()).unwrap();
    }
}

/// qemu-io on `export` of `server`'s store, over TLS with the credentials in `creds`.
pub fn qemu_io(
    lan: &Lan,
    i: usize,
    cmd: &str,
    creds: &Path,
    server: usize,
    export: &str,
) -> std::process::Output {
    output(
        lan.command(i, Path::new("qemu-io"))
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host={},port=10809,export={export},tls-creds=tls0",
                Lan::addr(server)
            ))
            .args(["-c", cmd]),
    )
}

pub fn exports(lan: &Lan, i: usize, server: usize, creds: &Path) -> String {
    let out = output(
        lan.command(i, Path::new("nbdinfo"))
            .arg("--list")
            .arg(format!(
                "nbds://{}:10809?tls-certificates={}",
                Lan::addr(server),
                creds.display()
            )),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
