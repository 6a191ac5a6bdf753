//! The durable record of what each out-of-sync replica missed: one file per volume and
//! replica node, `offset len` lines appended and synced before a completion relies on it.

use std::path::PathBuf;

use tessera_replication::regions::{Region, RegionSet};

/// `<data-dir>/replication/<volume>.<node>.missed`: by node id, which outlives a
/// primary (replica ids are positions in one configuration).
pub(super) fn missed_path(dir: &std::path::Path, volume: &str, node: &str) -> PathBuf {
    dir.join(format!("{volume}.{node}.missed"))
}

/// A missed-region record (`offset len` lines); `None` when there is none. A line
/// that does not parse (a torn append) is skipped: the region it belonged to was not
/// acknowledged to anyone, since completions wait for the record to be synced.
pub(super) fn load_missed(file: &std::path::Path) -> Option<RegionSet> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut set = RegionSet::new();
    for line in text.lines() {
        let mut it = line.split(' ').map(str::parse::<u64>);
        if let (Some(Ok(offset)), Some(Ok(len)), None) = (it.next(), it.next(), it.next()) {
            set.insert(Region { offset, len });
        }
    }
    Some(set)
}

/// The whole volume as one region.
pub(super) fn whole(size: u64) -> RegionSet {
    let mut set = RegionSet::new();
    set.insert(Region {
        offset: 0,
        len: size,
    });
    set
}

/// Appends `line` to the record `file` and syncs it (the catch-up too: a copy that gets
/// a snapshot carried lacks the whole head from then on).
pub(in crate::repl) fn append_synced(
    dir: &std::path::Path,
    file: &std::path::Path,
    line: &str,
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    f.write_all(line.as_bytes())?;
    f.sync_data()
}
