//! A partition instead of a death: three nodes in network namespaces (each store with its
//! replication endpoint), an HA VM counting on node1 on a 3-copy volume whose primary is
//! node1. node1's link goes down; nothing on it is killed by the test. Watched every
//! 50 ms: node1's VMM dies by itself (its guard's self-fence) within the bound of
//! docs/ha.md, the old copy's count stops before the new copy prints anything, and the
//! new copy reads from the disk the old copy's last acknowledged count and nothing later.
//! A write sent to node1's store as the old copy would have sent it (old generation) is
//! never acknowledged, during the partition nor after the heal, and is not on the disk.
//! Healed, node1 comes back up and reports its self-fence, and never starts the VM again
//! (it runs once, elsewhere).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_tests::cluster::{api, wait_for, wait_task};
use tessera_tests::vms::{
    alive, console, last_count, node_ids, upload_guest, vm, vm_pid, wait_state, VmCluster,
};
use tessera_tests::{counts, output, require, Lan};

const SIZE: u64 = 16 << 20;
/// Where the stale write goes: past the guest's sectors 0 and 1.
const STALE_AT: u64 = 4 << 20;
const STALE_LEN: usize = 64 << 10;
/// docs/ha.md: a cut-off node kills its VMMs 2 s after its last majority contact and
/// again at 2.5 s (watchdog); announcements come every 0.2 s and the guard looks every
/// 0.1 s, so the VMM is gone 2.6 s after the cut at the latest. Some room for a loaded
/// two-core machine, still below the 3 s after which the majority declares it down.
const SELF_FENCE_BOUND: Duration = Duration::from_millis(2_900);
/// The cut node is node1 (index 1): the API is called through node 0.
const CUT: usize = 1;

fn volume(lan: &Lan, t: &str) -> Value {
    let (code, v) = api(lan, 0, "GET", "volumes/part-root", Some(t), None);
    assert_eq!(code, 200, "{v}");
    v
}

fn node_state(lan: &Lan, t: &str, id: &str) -> Option<String> {
    let (_, v) = api(lan, 0, "GET", "nodes", Some(t), None);
    v.as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

/// Sector 1 of the volume through the store in `node_dir` (`COUNT=<k>`) and the stale
/// write's region.
fn read_disk(node_dir: &Path) -> (Option<u64>, Vec<u8>) {
    let sock = node_dir.join("store/nbd.sock");
    let o = output(
        Command::new("nbdcopy")
            .arg(format!("nbd+unix:///part-root?socket={}", sock.display()))
            .arg("--")
            .arg("-"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout[512..1024]);
    let count = s
        .trim_end_matches('\0')
        .strip_prefix("COUNT=")
        .and_then(|k| k.parse().ok());
    let at = STALE_AT as usize;
    (count, o.stdout[at..at + STALE_LEN].to_vec())
}

/// The count the new copy read from its disk at boot ("TESSERA-GUEST: disk holds COUNT=k").
fn disk_holds(console: &str) -> Option<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix("TESSERA-GUEST: disk holds COUNT="))
        .and_then(|k| k.trim().parse().ok())
}

pub fn run(c: &VmCluster) {
    require("nbdcopy");
    require("qemu-io");
    let (lan, nodes, t) = (&c.lan, &c.nodes, c.token.as_str());
    let ids = node_ids(lan, t, 3);
    upload_guest(lan, t, "guest", 3);
    let body = json!({"name": "part-root", "size_bytes": SIZE, "replicas": 3, "node": ids[CUT]});
    let (code, v) = api(lan, 0, "POST", "volumes", Some(t), Some(&body.to_string()));
    assert_eq!(code, 202, "{v}");
    assert_eq!(
        wait_task(lan, 0, t, v["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    let generation_before = wait_for("part-root's copies in sync", 60, || {
        let v = volume(lan, t);
        let synced = v["state"] == "ready"
            && v["replication"]["copies"].as_array().is_some_and(|c| {
                c.len() == 3
                    && c.iter()
                        .all(|c| c["state"] == "in_sync" && c.get("joining").is_none())
            });
        synced.then(|| v["replication"]["generation"].as_u64().unwrap())
    });
    let body = json!({
        "name": "part1", "vcpus": 1, "memory_mib": 64, "disks": ["part-root"],
        "image": "guest", "cmdline": "console=ttyS0 tessera.mode=count",
        "ha": true, "priority": 10, "desired_state": "running",
    });
    let (code, v) = api(lan, 0, "POST", "vms", Some(t), Some(&body.to_string()));
    assert_eq!(code, 201, "{v}");
    let v = wait_state(lan, 0, t, "part1", "running");
    assert_eq!(v["running_on"], ids[CUT].as_str(), "with its disk: {v}");
    let old_dir = &nodes[CUT].dir;
    // Past two COUNT= writes on the disk.
    wait_for("part1 counting past 11 on node1", 60, || {
        (last_count(old_dir, "part1") > Some(11)).then_some(())
    });
    let old_pid = vm_pid(old_dir, "part1").unwrap();

    lan.set_link(CUT, false);
    let cut = Instant::now();
    // Watch both sides until the new copy has counted a little.
    let others: Vec<usize> = (0..3).filter(|i| *i != CUT).collect();
    let mut old_last = last_count(old_dir, "part1");
    let mut old_changed = cut;
    let mut old_gone: Option<Duration> = None;
    let (new_i, new_first) = loop {
        let at = cut.elapsed();
        let now = last_count(old_dir, "part1");
        if now != old_last {
            old_last = now;
            old_changed = Instant::now();
        }
        if old_gone.is_none() && !alive(old_pid) {
            old_gone = Some(at);
        }
        if let Some(i) = others
            .iter()
            .copied()
            .find(|i| !counts(&console(&nodes[*i].dir, "part1")).is_empty())
        {
            break (i, at);
        }
        assert!(
            at < Duration::from_secs(60),
            "part1 never counted on another node; old VMM alive: {}",
            alive(old_pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let old_gone = old_gone.unwrap_or_else(|| {
        panic!("node1's VMM still ran when the new copy counted ({new_first:?} after the cut)")
    });
    let old_stopped = old_changed.duration_since(cut);
    eprintln!(
        "partition: node1's VMM gone {old_gone:?} after the cut, its last count ({old_last:?}) \
         {old_stopped:?} after; the new copy on node{new_i} counted {new_first:?} after"
    );
    assert!(
        old_gone <= SELF_FENCE_BOUND,
        "node1's VMM lived {old_gone:?} after the cut (bound {SELF_FENCE_BOUND:?})"
    );
    assert!(
        old_stopped < new_first && old_gone < new_first,
        "two copies made progress at once: old count changed {old_stopped:?}, VMM gone \
         {old_gone:?}, new copy counted {new_first:?} after the cut"
    );
    let old_last = old_last.unwrap();
    let v = vm(lan, 0, t, "part1");
    assert_eq!(v["running_on"], ids[new_i].as_str(), "{v}");

    // The disk, as the new copy found it: the old copy's last write that could have been
    // acknowledged (it writes every fifth count and stalls on a write it cannot complete),
    // nothing it might have sent later.
    let new_console = wait_for("the new copy's disk line", 20, || {
        let text = console(&nodes[new_i].dir, "part1");
        disk_holds(&text).map(|_| text)
    });
    let found = disk_holds(&new_console).unwrap();
    assert!(
        found.is_multiple_of(5) && found <= old_last && found + 5 >= old_last && found >= 10,
        "the new copy found COUNT={found}, the old copy's last count was {old_last}"
    );
    let volume_now = volume(lan, t);
    assert!(
        volume_now["replication"]["generation"].as_u64().unwrap() > generation_before,
        "{volume_now}"
    );

    // A write to node1's store as the old copy would send it, in the old generation
    // (qemu-io: a client we did not write). node1 still believes it is the primary.
    let sock = old_dir.join("store/nbd.sock");
    let mut stale = Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("write -P 0xee {STALE_AT} {STALE_LEN}"))
        .args(["-c", "flush"])
        .arg(format!("nbd+unix:///part-root?socket={}", sock.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Still cut off: it must not be acknowledged while the new copy counts on.
    let past = last_count(&nodes[new_i].dir, "part1").unwrap_or(0) + 10;
    wait_for("the new copy counting on", 60, || {
        (last_count(&nodes[new_i].dir, "part1") > Some(past)).then_some(())
    });
    let early = stale.try_wait().unwrap();
    if let Some(status) = early {
        assert!(
            !status.success(),
            "node1's store acknowledged a stale write"
        );
    }
    assert_eq!(vm_pid(old_dir, "part1"), None, "node1 runs part1 again");
    let old_console = console(old_dir, "part1");
    assert_eq!(
        counts(&old_console).last(),
        Some(&old_last),
        "the old copy counted on"
    );

    // Heal. node1 comes back up and reports what it stopped; its stale write fails.
    lan.set_link(CUT, true);
    let healed = Instant::now();
    // node1 may clean up the VM's directory, never print to it again.
    let no_second_copy = || {
        assert_eq!(vm_pid(old_dir, "part1"), None, "node1 started part1 again");
        let now = console(old_dir, "part1");
        assert!(
            now.is_empty() || now == old_console,
            "node1's console of part1 changed after the heal: {now}"
        );
    };
    wait_for("node1 up again", 30, || {
        no_second_copy();
        (node_state(lan, t, &ids[CUT]).as_deref() == Some("up")).then_some(())
    });
    // The kill was node1's own (its guard's), not anything else's.
    let log = std::fs::read_to_string(old_dir.join("tesserad.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("self-fence: killing the VMM") && l.contains("part1")),
        "node1's log does not show its guard killing part1's VMM"
    );
    // Back in contact, node1 records what it stopped (an ha.self_fence event).
    wait_for("node1's ha.self_fence event", 30, || {
        no_second_copy();
        let (_, ev) = api(lan, 0, "GET", "events?limit=10000", Some(t), None);
        ev.as_array()?
            .iter()
            .find(|e| {
                e["kind"] == "ha.self_fence"
                    && e["target"] == ids[CUT].as_str()
                    && e["message"].as_str().is_some_and(|m| m.contains("part1"))
            })
            .cloned()
    });
    let status = match early {
        Some(s) => s,
        None => wait_for("the stale write to end after the heal", 60, || {
            no_second_copy();
            stale.try_wait().unwrap()
        }),
    };
    let o = stale.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        !status.success() || said.contains("failed") || said.contains("error"),
        "node1's store acknowledged a stale write: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // node1's copy rejoins the in-sync set; node1 still runs nothing.
    wait_for("part-root's three copies in sync again", 90, || {
        no_second_copy();
        let v = volume(lan, t);
        v["replication"]["copies"]
            .as_array()
            .is_some_and(|c| {
                c.len() == 3
                    && c.iter()
                        .all(|c| c["state"] == "in_sync" && c.get("joining").is_none())
            })
            .then_some(())
    });
    eprintln!("partition healed; node1 back in {:?}", healed.elapsed());
    no_second_copy();
    let v = vm(lan, 0, t, "part1");
    assert_eq!(
        (v["running_on"].as_str(), v["placed_on"].as_str()),
        (Some(ids[new_i].as_str()), Some(ids[new_i].as_str())),
        "{v}"
    );
    let banners: usize = std::iter::once(old_console.clone())
        .chain(others.iter().map(|i| console(&nodes[*i].dir, "part1")))
        .map(|c| c.matches("tessera test guest").count())
        .sum();
    assert_eq!(
        banners, 2,
        "the guest booted exactly twice (node1, then node{new_i})"
    );

    // Stopped, the disk through its primary: the new copy's last write, not the stale one.
    let (code, v) = api(lan, 0, "POST", "vms/part1/stop", Some(t), None);
    assert_eq!(code, 202, "{v}");
    wait_state(lan, 0, t, "part1", "stopped");
    let new_last = last_count(&nodes[new_i].dir, "part1").unwrap();
    let primary = volume(lan, t)["replication"]["primary"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(primary, ids[CUT], "the primary stayed on node1");
    let p = ids.iter().position(|id| *id == primary).unwrap();
    let (count, region) = read_disk(&nodes[p].dir);
    assert_eq!(
        count,
        Some(new_last - new_last % 5),
        "COUNT= through node{p} (the new copy's last count {new_last})"
    );
    assert!(
        region.iter().all(|b| *b != 0xee),
        "the stale write is on the disk"
    );
}
