//! The model's power-loss rules, one by one, without FUSE.

use std::collections::HashSet;
use std::ffi::OsStr;

use rand::SeedableRng;

use super::*;

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn file(m: &Model, parent: Ino, n: &str) -> Option<Vec<u8>> {
    let ino = m.lookup(parent, name(n)).ok()?;
    match m.node(ino).ok()? {
        Node::File(f) => Some(f.content().read(0, u64::MAX)),
        Node::Dir(_) => None,
    }
}

/// A model with a durable file `f` in the root holding `content`.
fn with_durable_file(content: &[u8]) -> (Model, Ino) {
    let mut m = Model::default();
    let ino = m.create(ROOT, name("f"), false).unwrap();
    m.file_mut(ino).unwrap().write(0, content);
    m.sync(ino).unwrap();
    m.sync(ROOT).unwrap();
    (m, ino)
}

#[test]
fn unsynced_writes_are_dropped_and_synced_ones_kept() {
    let (mut m, ino) = with_durable_file(b"old");
    m.file_mut(ino).unwrap().write(0, b"new, longer");
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(file(&m, ROOT, "f").unwrap(), b"old");

    m.file_mut(ino).unwrap().write(0, b"new, longer");
    m.sync(ino).unwrap();
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(file(&m, ROOT, "f").unwrap(), b"new, longer");
}

#[test]
fn a_synced_file_in_an_unsynced_directory_is_lost() {
    let mut m = Model::default();
    let ino = m.create(ROOT, name("new"), false).unwrap();
    m.file_mut(ino).unwrap().write(0, b"data");
    m.sync(ino).unwrap();
    let report = m.cut(CutMode::DropAll, &mut rng(1));
    assert!(
        file(&m, ROOT, "new").is_none(),
        "file survived without a directory sync"
    );
    assert_eq!(report.orphans, 1);
    assert!(
        report.lost.iter().any(|l| l.contains("create new")),
        "{report:?}"
    );
}

#[test]
fn a_directory_whose_parent_was_never_synced_is_lost_with_its_files() {
    let mut m = Model::default();
    let d = m.create(ROOT, name("d"), true).unwrap();
    let f = m.create(d, name("f"), false).unwrap();
    m.file_mut(f).unwrap().write(0, b"x");
    m.sync(f).unwrap();
    m.sync(d).unwrap();
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(m.lookup(ROOT, name("d")), Err(FsError::NotFound));
}

#[test]
fn rename_and_unlink_are_durable_only_after_the_directory_sync() {
    let (mut m, _) = with_durable_file(b"old");
    let tmp = m.create(ROOT, name("tmp"), false).unwrap();
    m.file_mut(tmp).unwrap().write(0, b"new");
    m.sync(tmp).unwrap();
    m.rename(ROOT, name("tmp"), ROOT, name("f"), false).unwrap();
    assert_eq!(file(&m, ROOT, "f").unwrap(), b"new");
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(
        file(&m, ROOT, "f").unwrap(),
        b"old",
        "rename survived unsynced"
    );
    assert!(file(&m, ROOT, "tmp").is_none());

    let tmp = m.create(ROOT, name("tmp"), false).unwrap();
    m.file_mut(tmp).unwrap().write(0, b"new");
    m.sync(tmp).unwrap();
    m.rename(ROOT, name("tmp"), ROOT, name("f"), false).unwrap();
    m.sync(ROOT).unwrap();
    m.remove(ROOT, name("f"), false).unwrap();
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(
        file(&m, ROOT, "f").unwrap(),
        b"new",
        "unsynced unlink survived"
    );
}

#[test]
fn lying_sync_makes_nothing_durable() {
    let (mut m, ino) = with_durable_file(b"old");
    m.lying_sync = true;
    m.file_mut(ino).unwrap().write(0, b"new");
    m.sync(ino).unwrap();
    m.sync(ROOT).unwrap();
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(file(&m, ROOT, "f").unwrap(), b"old");
    assert_eq!(m.syncs.lied, 2);
}

#[test]
fn punch_and_truncate_follow_the_same_rules() {
    let (mut m, ino) = with_durable_file(&[7u8; 3 * PAGE as usize]);
    let f = m.file_mut(ino).unwrap();
    f.punch(100, PAGE + 10);
    f.set_len(PAGE * 2 + 1);
    let now = f.content().read(0, u64::MAX);
    assert_eq!(now.len(), 2 * PAGE as usize + 1);
    assert!(now[100..(PAGE + 110) as usize].iter().all(|b| *b == 0));
    assert!(now[..100]
        .iter()
        .chain(&now[(PAGE + 110) as usize..])
        .all(|b| *b == 7));
    m.cut(CutMode::DropAll, &mut rng(1));
    assert_eq!(file(&m, ROOT, "f").unwrap(), vec![7u8; 3 * PAGE as usize]);
}

#[test]
fn a_tear_keeps_per_page_prefixes_of_the_unsynced_writes() {
    // Durable: two pages of 'a'. Unsynced: page 0 := 'b', then one write over both pages
    // := 'c'. Page 0 may hold a, b or c; page 1 a or c; nothing else.
    let mut outcomes = HashSet::new();
    for seed in 0..400 {
        let (mut m, ino) = with_durable_file(&[b'a'; 2 * PAGE as usize]);
        let f = m.file_mut(ino).unwrap();
        f.write(0, &[b'b'; PAGE as usize]);
        f.write(0, &[b'c'; 2 * PAGE as usize]);
        m.cut(CutMode::Tear, &mut rng(seed));
        let got = file(&m, ROOT, "f").unwrap();
        let (p0, p1) = got.split_at(PAGE as usize);
        assert!(p0.iter().all(|b| *b == p0[0]) && p1.iter().all(|b| *b == p1[0]));
        outcomes.insert((p0[0], p1[0]));
    }
    let want: HashSet<(u8, u8)> = [b'a', b'b', b'c']
        .iter()
        .flat_map(|p0| [(*p0, b'a'), (*p0, b'c')])
        .collect();
    assert_eq!(outcomes, want);
}

#[test]
fn a_tear_may_keep_an_append_without_its_size_or_the_size_without_its_data() {
    let mut seen = HashSet::new();
    for seed in 0..200 {
        let (mut m, ino) = with_durable_file(b"x");
        m.file_mut(ino).unwrap().write(PAGE, b"yy");
        m.cut(CutMode::Tear, &mut rng(seed));
        let got = file(&m, ROOT, "f").unwrap();
        match got.len() {
            1 => {}
            n if n == PAGE as usize + 2 => {
                assert!(got[1..PAGE as usize].iter().all(|b| *b == 0));
                assert!(got[PAGE as usize..] == *b"yy" || got[PAGE as usize..] == [0, 0]);
            }
            n => panic!("impossible size {n}"),
        }
        seen.insert((got.len(), got.last().copied()));
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn a_tear_keeps_a_prefix_of_each_directory_s_changes() {
    let mut seen = HashSet::new();
    for seed in 0..100 {
        let mut m = Model::default();
        m.create(ROOT, name("a"), false).unwrap();
        m.create(ROOT, name("b"), false).unwrap();
        m.cut(CutMode::Tear, &mut rng(seed));
        let a = m.lookup(ROOT, name("a")).is_ok();
        let b = m.lookup(ROOT, name("b")).is_ok();
        assert!(a || !b, "b created after a survived without a");
        seen.insert((a, b));
    }
    assert_eq!(seen.len(), 3);
}

#[test]
fn names_and_kinds_are_checked() {
    let mut m = Model::default();
    let d = m.create(ROOT, name("d"), true).unwrap();
    m.create(d, name("f"), false).unwrap();
    assert_eq!(m.create(ROOT, name("d"), false), Err(FsError::Exists));
    assert_eq!(m.remove(ROOT, name("d"), true), Err(FsError::NotEmpty));
    assert_eq!(m.remove(ROOT, name("d"), false), Err(FsError::IsDir));
    assert_eq!(m.remove(d, name("f"), true), Err(FsError::NotDir));
    m.create(ROOT, name("g"), false).unwrap();
    assert_eq!(
        m.rename(ROOT, name("g"), ROOT, name("d"), false),
        Err(FsError::IsDir)
    );
    assert_eq!(
        m.rename(ROOT, name("d"), ROOT, name("g"), true),
        Err(FsError::Exists)
    );
}
