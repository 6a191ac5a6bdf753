//! Boot images and templates on a three-node cluster (network namespaces, a
//! `tessera-store` per node): the test guest uploaded as a boot image to node0 is copied
//! to every node (each copy checked by blake3), a VM booting it from a new volume runs on
//! node1 and counts on its console, the VM becomes a template that cannot start, a VM
//! created `--from` it gets a copy-on-write clone of its disk and counts too, and on a node
//! whose copy was damaged it boots from a fresh, checked copy. Bad input is
//! refused with a clear 4xx and nothing changed: a body shorter than it says, an oversize
//! body (declared and streamed), an unknown image, an image in use deleted, a template
//! started, a volume attached to another VM, a running VM deleted.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::Path;

use serde_json::{json, Value};
use tessera_tests::cluster::{api, curl, wait_for, wait_task};
use tessera_tests::vms::{self, node_ids, wait_state, VmCluster, GUEST};
use tessera_tests::{counts, output, Lan};

const PASSWORD: &str = "vm-images-password-1";

fn get(lan: &Lan, t: &str, path: &str) -> (u16, Value) {
    api(lan, 0, "GET", path, Some(t), None)
}

/// Waits until VM `name`'s guest on the node in `dir` has counted to at least 3.
fn counting(dir: &Path, name: &str) {
    let log = dir.join(format!("data/vms/{name}/console.log"));
    wait_for(&format!("VM {name}'s guest to count"), 60, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (counts(&text).last() >= Some(&3)).then_some(())
    });
}

fn blake3_hex(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

#[test]
fn a_boot_image_boots_vms_on_every_node_and_templates_clone_them() {
    let test = "a_boot_image_boots_vms_on_every_node_and_templates_clone_them";
    let Some(c) = VmCluster::start(test, 3, PASSWORD) else {
        return;
    };
    let (lan, nodes, d, t) = (&c.lan, &c.nodes, &c.dir, c.token.as_str());
    let bearer = format!("Authorization: Bearer {t}");
    let ids = node_ids(lan, t, 3);
    let nothing_uploaded = |why: &str| {
        let (code, v) = get(lan, t, "images");
        assert_eq!(
            (code, v.as_array().map(Vec::len)),
            (200, Some(0)),
            "{why}: {v}"
        );
        let left = std::fs::read_dir(nodes[0].dir.join("data/images"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{why}: files left behind on node0");
    };

    // Bad uploads: a body shorter than kernel_bytes says; a body declared larger than
    // 256 MiB (refused before it is read); one streamed past 256 MiB. Nothing is kept.
    let (code, text) = curl(
        lan,
        0,
        "images?name=guest&kernel_bytes=100",
        &["-X", "POST", "-H", &bearer, "--data-binary", "short"],
    );
    assert!(
        code == 400 && text.contains("kernel_bytes"),
        "{code} {text}"
    );
    nothing_uploaded("a short body");
    let (code, text) = curl(
        lan,
        0,
        "images?name=guest&kernel_bytes=1",
        &[
            "-X",
            "POST",
            "-H",
            &bearer,
            "-H",
            "Content-Length: 300000000",
            "--data-binary",
            "x",
        ],
    );
    assert_eq!(code, 413, "{text}");
    nothing_uploaded("a declared oversize body");
    let mut c = lan.command(0, Path::new("sh"));
    c.arg("-c").arg(format!(
        "head -c 268435457 /dev/zero | curl -s -m 60 -o /dev/null -w '%{{http_code}}' --cacert {} \
         -H '{bearer}' -H 'Content-Type: application/octet-stream' -X POST -T - \
         'https://{}:8006/api/v1/images?name=guest&kernel_bytes=1'",
        lan.ca_file().unwrap().display(),
        Lan::addr(0)
    ));
    let o = output(&mut c);
    let code = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(code.starts_with("413"), "streamed oversize body: {code:?}");
    nothing_uploaded("a streamed oversize body");

    // The CLI, logged in on node0.
    let home = d.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cli = |args: &[&str], stdin: &str| vms::cli(lan, 0, &home, args, stdin);
    let (ok, out, err) = cli(&["login", "--user", "admin"], &format!("{PASSWORD}\n"));
    assert!(ok, "{out}{err}");

    // The test guest as a boot image, uploaded to node0: every node gets a verified copy.
    let cmdline = "console=ttyS0 tessera.mode=count";
    let (ok, out, err) = cli(
        &[
            "image",
            "upload",
            "guest",
            "--kernel",
            GUEST,
            "--cmdline",
            cmdline,
        ],
        "",
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["image", "upload", "guest", "--kernel", GUEST], "");
    assert!(!ok && err.contains("409"), "a second upload: {out}{err}");
    let want = blake3_hex(Path::new(GUEST));
    let img = wait_for("a copy of the image on every node", 30, || {
        let (_, v) = get(lan, t, "images/guest");
        (v["copies"].as_array().map(Vec::len) == Some(3)).then_some(v)
    });
    assert_eq!(img["kernel"]["blake3"], want.as_str(), "{img}");
    assert_eq!(img["cmdline"], cmdline, "{img}");
    for n in nodes {
        assert_eq!(blake3_hex(&n.dir.join("data/images/guest/kernel")), want);
    }
    let (ok, out, err) = cli(&["image", "ls"], "");
    assert!(ok && out.contains("guest"), "{out}{err}");

    // An unknown image: 404, no VM.
    let body = json!({ "name": "lost", "vcpus": 1, "memory_mib": 64, "image": "nope" });
    let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body.to_string()));
    assert!(
        code == 404 && v["error"].as_str().unwrap().contains("nope"),
        "{v}"
    );
    assert_eq!(get(lan, t, "vms/lost").0, 404);

    // A VM booting the image from a new volume on node1: it runs there (its disk's node,
    // not the node the image was uploaded to) and the guest counts.
    let body = json!({ "name": "base", "size_bytes": 16 << 20, "node": ids[1], "replicas": 1 })
        .to_string();
    let (code, v) = api(lan, 0, "POST", "volumes", Some(t), Some(&body));
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    let (ok, out, err) = cli(
        &[
            "vm", "create", "tpl", "--image", "guest", "--disk", "base", "--memory", "64M",
        ],
        "",
    );
    assert!(ok, "{out}{err}");
    let (code, v) = api(lan, 0, "POST", "vms/tpl/start", Some(t), None);
    assert_eq!(code, 202, "{v}");
    let v = wait_state(lan, 0, t, "tpl", "running");
    assert_eq!(v["running_on"], ids[1].as_str(), "{v}");
    counting(&nodes[1].dir, "tpl");

    // In use: the image cannot be deleted; a running VM cannot be deleted or made a
    // template; nothing changes.
    let (ok, out, err) = cli(&["image", "rm", "guest"], "");
    assert!(
        !ok && err.contains("409") && err.contains("tpl"),
        "{out}{err}"
    );
    assert_eq!(get(lan, t, "images/guest").1["deleting"], false);
    let (code, v) = api(lan, 0, "DELETE", "vms/tpl", Some(t), None);
    assert_eq!(code, 409, "{v}");
    let (code, v) = api(lan, 0, "POST", "vms/tpl/template", Some(t), None);
    assert_eq!(code, 409, "{v}");
    assert_eq!(get(lan, t, "vms/tpl").1["actual_state"], "running");

    // Stopped, it becomes a template: it cannot start.
    let (code, v) = api(lan, 0, "POST", "vms/tpl/stop", Some(t), None);
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "tpl", "stopped");
    let (ok, out, err) = cli(&["vm", "template", "tpl"], "");
    assert!(ok && out.contains("template"), "{out}{err}");
    let (code, v) = api(lan, 0, "POST", "vms/tpl/start", Some(t), None);
    assert!(
        code == 409 && v["error"].as_str().unwrap().contains("template"),
        "{v}"
    );
    let v = get(lan, t, "vms/tpl").1;
    assert_eq!(
        (v["desired_state"].as_str(), v["template"].as_bool()),
        (Some("stopped"), Some(true))
    );

    // A VM from the template: a copy-on-write clone of its disk (once the template's
    // snapshot is ready), the same image and command line; it runs and counts.
    let (ok, out, err) = wait_for("a VM created from the template", 30, || {
        let r = cli(&["vm", "create", "web", "--from", "tpl"], "");
        (r.0 || !r.2.contains("not ready")).then_some(r)
    });
    assert!(ok, "{out}{err}");
    let v = get(lan, t, "vms/web").1;
    assert_eq!(v["disks"], json!(["web-disk0"]), "{v}");
    assert_eq!(
        (v["image"].as_str(), v["memory_mib"].as_u64()),
        (Some("guest"), Some(64))
    );
    wait_for("the clone to be ready", 30, || {
        (get(lan, t, "volumes/web-disk0").1["state"] == "ready").then_some(())
    });
    assert_eq!(
        get(lan, t, "volumes/web-disk0").1["origin"],
        "base@template"
    );
    let (code, v) = api(lan, 2, "POST", "vms/web/start", Some(t), None);
    assert_eq!(code, 202, "{v}");
    let v = wait_state(lan, 0, t, "web", "running");
    assert_eq!(v["running_on"], ids[1].as_str(), "{v}");
    counting(&nodes[1].dir, "web");

    // A volume attached to another VM cannot be attached again (so never started twice).
    let body = json!({ "name": "thief", "vcpus": 1, "memory_mib": 64, "image": "guest",
        "disks": ["web-disk0"] });
    let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body.to_string()));
    assert!(
        code == 409 && v["error"].as_str().unwrap().contains("web"),
        "{v}"
    );
    assert_eq!(get(lan, t, "vms/thief").0, 404);
    let (code, v) = api(lan, 0, "DELETE", "vms/web", Some(t), None);
    assert_eq!(code, 409, "{v}");
    let (code, v) = api(lan, 0, "POST", "vms/web/kill", Some(t), None);
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "web", "stopped");

    // node2's copy is damaged (same size, other bytes): a VM started there is booted
    // from a fresh copy fetched from another node and checked, not from the damaged one.
    let copy = nodes[2].dir.join("data/images/guest/kernel");
    let len = std::fs::metadata(&copy).unwrap().len() as usize;
    std::fs::write(&copy, vec![0x90u8; len]).unwrap();
    let body = json!({ "node": ids[2] }).to_string();
    assert_eq!(api(lan, 0, "PATCH", "vms/web", Some(t), Some(&body)).0, 200);
    let (code, v) = api(lan, 0, "POST", "vms/web/start", Some(t), None);
    assert_eq!(code, 202, "{v}");
    let v = wait_state(lan, 0, t, "web", "running");
    assert_eq!(v["running_on"], ids[2].as_str(), "{v}");
    counting(&nodes[2].dir, "web");
    assert_eq!(blake3_hex(&copy), want, "the damaged copy was not replaced");
    let (code, v) = api(lan, 0, "POST", "vms/web/kill", Some(t), None);
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "web", "stopped");
}
