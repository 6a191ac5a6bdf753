//! The node image's two root slots (A/B) and their boot entries, without I/O.
//!
//! The disk holds two root partitions, `tessera-root-a` and `tessera-root-b`. Each slot
//! has one systemd-boot entry on the ESP, `loader/entries/tessera-<seq>-<slot>.conf`,
//! booting the slot's kernel (`/tessera/<slot>/`) with `root=PARTUUID=<the slot's>` and
//! `tessera.slot=<slot>` on the command line. An upgrade writes the slot that is not
//! running and gives its entry the next `seq` and a boot counter
//! (`tessera-<seq>-<slot>+3.conf`). systemd-boot (252) orders entries with no tries left
//! last and the others by id, newest version first, and boots the first: the new entry
//! wins while it has tries; each boot of it takes one (`+2-1`, ...); once
//! `systemd-bless-boot` marks it good (after `boot-complete.target`, which the health
//! check gates) the counter is dropped from its name. Three boots that never reach good
//! leave it `+0-3`, sorted last: the node boots the other slot's entry again by itself.

use std::fmt;

/// One of the two root slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// `a` or `b`, as in names and on the kernel command line.
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot: where an upgrade goes when this one runs.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The GPT partition name (and `/dev/disk/by-partlabel/` link) of the slot.
    pub fn partlabel(self) -> String {
        format!("tessera-root-{}", self.letter())
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// The slot the running system booted from: `tessera.slot=` on the kernel command line
/// (`/proc/cmdline`). None on a machine not booted from the node image.
pub fn booted_slot(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tessera.slot="))
        .and_then(Slot::parse)
}

/// A boot entry of ours on the ESP, from its file name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The file name in `loader/entries/`.
    pub file: String,
    /// Its place in the order of installation: a newer entry has a larger one.
    pub seq: u64,
    pub slot: Slot,
    /// Boots left before systemd-boot gives up on it (None: no counter, a good entry).
    pub tries_left: Option<u32>,
    /// Boots tried so far without reaching good.
    pub tries_done: u32,
}

impl Entry {
    /// `tessera-<seq>-<slot>[+LEFT[-DONE]].conf`; None for any other file.
    pub fn parse(file: &str) -> Option<Entry> {
        let stem = file.strip_suffix(".conf")?.strip_prefix("tessera-")?;
        let (name, counter) = match stem.split_once('+') {
            Some((n, c)) => (n, Some(c)),
            None => (stem, None),
        };
        let (seq, slot) = name.split_once('-')?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let seq = seq.parse().ok()?;
        let slot = Slot::parse(slot)?;
        let (tries_left, tries_done) = match counter {
            None => (None, 0),
            Some(c) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l, d.parse().ok()?),
                    None => (c, 0),
                };
                (Some(left.parse().ok()?), done)
            }
        };
        Some(Entry {
            file: file.to_string(),
            seq,
            slot,
            tries_left,
            tries_done,
        })
    }

    /// systemd-boot will not pick it while another entry has tries left.
    pub fn is_bad(&self) -> bool {
        self.tries_left == Some(0)
    }

    /// Still on trial: booted (or to be booted) with a counter, not yet blessed.
    pub fn on_trial(&self) -> bool {
        self.tries_left.is_some_and(|l| l > 0)
    }
}

/// Our entries among the ESP's file names, in the order systemd-boot tries them: bad
/// ones last, then the newest (largest `seq`) first.
pub fn entries<'a>(files: impl IntoIterator<Item = &'a str>) -> Vec<Entry> {
    let mut v: Vec<Entry> = files.into_iter().filter_map(Entry::parse).collect();
    v.sort_by(|a, b| a.is_bad().cmp(&b.is_bad()).then(b.seq.cmp(&a.seq)));
    v
}

/// The file name of a new entry for `slot` with `tries` boots to prove itself: the next
/// `seq` after every entry there is.
pub fn new_entry_file(existing: &[Entry], slot: Slot, tries: u32) -> String {
    let seq = existing.iter().map(|e| e.seq).max().unwrap_or(0) + 1;
    format!("tessera-{seq}-{slot}+{tries}.conf")
}

/// The text of a slot's boot entry. The options are image/build's: `no_timer_check`
/// because the kernel's IO-APIC timer check panics when a busy host misses its deadline.
pub fn entry_text(slot: Slot, partuuid: &str, release: &str) -> String {
    format!(
        "title   Tessera node {release} (slot {slot})\n\
         version {release}\n\
         linux   /tessera/{slot}/vmlinuz\n\
         initrd  /tessera/{slot}/initrd.img\n\
         options root=PARTUUID={partuuid} rw tessera.slot={slot} console=tty0 console=ttyS0,115200 no_timer_check quiet\n"
    )
}

/// A release name as `/etc/tessera-release` holds it: 1-64 printable ASCII characters
/// without spaces (it goes into boot entries and the console).
pub fn check_release(release: &str) -> Result<(), String> {
    let ok =
        !release.is_empty() && release.len() <= 64 && release.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "release {release:?}: 1-64 printable characters without spaces"
        ))
    }
}

/// Is the node healthy, by `tesserad`'s status document: a member of a formed cluster
/// that has a leader. Err says what is missing.
pub fn healthy(status: &serde_json::Value) -> Result<(), String> {
    let Some(cluster) = status["cluster_id"].as_str() else {
        return Err("the cluster is not formed yet".into());
    };
    let me = status["node_id"].as_str().unwrap_or_default();
    if status["nodes"].get(me).is_none() {
        return Err(format!(
            "cluster {cluster}: this node ({me}) is not in the node table yet"
        ));
    }
    if status["leader"].as_u64().is_none() {
        return Err(format!("cluster {cluster}: no leader"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_parse_with_and_without_counters() {
        let e = Entry::parse("tessera-2-b+3.conf").unwrap();
        assert_eq!(
            (e.seq, e.slot, e.tries_left, e.tries_done),
            (2, Slot::B, Some(3), 0)
        );
        assert!(e.on_trial() && !e.is_bad());
        let e = Entry::parse("tessera-7-a+1-2.conf").unwrap();
        assert_eq!((e.tries_left, e.tries_done), (Some(1), 2));
        let e = Entry::parse("tessera-7-a+0-3.conf").unwrap();
        assert!(e.is_bad() && !e.on_trial());
        let e = Entry::parse("tessera-1-a.conf").unwrap();
        assert_eq!((e.tries_left, e.on_trial()), (None, false));
        for other in [
            "tessera.conf",
            "tessera-x-a.conf",
            "tessera-1-c.conf",
            "tessera-1-a+x.conf",
            "debian-1-a.conf",
            "tessera-1-a.conf.new",
            "tessera--a.conf",
        ] {
            assert_eq!(Entry::parse(other), None, "{other}");
        }
    }

    #[test]
    fn the_newest_entry_with_tries_left_comes_first_and_a_spent_one_last() {
        let order = |files: &[&str]| -> Vec<String> {
            entries(files.iter().copied())
                .into_iter()
                .map(|e| e.file)
                .collect()
        };
        assert_eq!(
            order(&["tessera-1-a.conf", "tessera-2-b+3.conf"]),
            ["tessera-2-b+3.conf", "tessera-1-a.conf"]
        );
        // Three failed boots: the upgrade's entry goes last and the old slot boots.
        assert_eq!(
            order(&["tessera-3-a+0-3.conf", "tessera-2-b.conf"]),
            ["tessera-2-b.conf", "tessera-3-a+0-3.conf"]
        );
        // seq 10 is newer than seq 9 (numbers, not text).
        assert_eq!(
            order(&["tessera-9-a.conf", "tessera-10-b+1-2.conf", "loader.conf"]),
            ["tessera-10-b+1-2.conf", "tessera-9-a.conf"]
        );
    }

    #[test]
    fn a_new_entry_takes_the_next_seq_and_a_counter() {
        let e = entries(["tessera-1-a.conf", "tessera-4-b+0-3.conf"]);
        assert_eq!(new_entry_file(&e, Slot::B, 3), "tessera-5-b+3.conf");
        assert_eq!(new_entry_file(&[], Slot::A, 1), "tessera-1-a+1.conf");
    }

    #[test]
    fn the_booted_slot_comes_from_the_command_line() {
        assert_eq!(
            booted_slot("root=PARTUUID=x rw tessera.slot=b quiet"),
            Some(Slot::B)
        );
        assert_eq!(booted_slot("root=/dev/sda1 quiet"), None);
        assert_eq!(booted_slot("tessera.slot=c"), None);
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.partlabel(), "tessera-root-b");
    }

    #[test]
    fn an_entry_boots_its_slot_kernel_and_root() {
        let t = entry_text(Slot::B, "1234-abcd", "n+1");
        assert!(t.contains("linux   /tessera/b/vmlinuz\n"), "{t}");
        assert!(t.contains("initrd  /tessera/b/initrd.img\n"), "{t}");
        assert!(
            t.contains("root=PARTUUID=1234-abcd rw tessera.slot=b "),
            "{t}"
        );
        assert!(t.contains(" no_timer_check "), "{t}");
    }

    #[test]
    fn releases_are_short_printable_words() {
        assert!(check_release("2026.12.03-1").is_ok());
        assert!(check_release("").is_err());
        assert!(check_release("a b").is_err());
        assert!(check_release(&"x".repeat(65)).is_err());
    }

    #[test]
    fn healthy_means_member_of_a_formed_cluster_with_a_leader() {
        use serde_json::json;
        assert!(healthy(&json!({})).is_err());
        let mut s = json!({"cluster_id": "c1", "node_id": "n1", "nodes": {}, "leader": 1});
        assert!(healthy(&s).unwrap_err().contains("not in the node table"));
        s["nodes"]["n1"] = json!({"name": "node1"});
        assert!(healthy(&s).is_ok());
        s["leader"] = serde_json::Value::Null;
        assert!(healthy(&s).unwrap_err().contains("no leader"));
    }
}
