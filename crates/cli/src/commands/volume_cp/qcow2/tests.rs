//! The writer's images read back by the reader, and the header refusals. qemu-img
//! checks both against qemu's own code in tests/tests/volume_cp_qcow2.rs.

use std::os::unix::fs::FileExt;

use super::*;

fn temp(name: &str) -> (std::path::PathBuf, std::fs::File) {
    let dir = std::env::temp_dir().join(format!("tessera-qcow2-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("img.qcow2");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    (path, f)
}

#[test]
fn what_the_writer_writes_the_reader_reads_back_with_zeros_unallocated() {
    let (path, f) = temp("roundtrip");
    let size = (1u64 << 30) + 12345; // past one L2 table's span, not cluster-aligned
    let w = Writer::create(f, size);
    let a = vec![7u8; 100_000];
    let b = vec![9u8; 5000];
    w.write(3 << 20, &a).unwrap();
    w.write(size - 5000, &b).unwrap();
    w.write(70_000, &[1, 2, 3]).unwrap();
    w.finish().unwrap();
    let r = Reader::open(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(r.size(), size);
    assert_eq!(r.read(3 << 20, a.len()).unwrap(), a);
    assert_eq!(r.read(size - 5000, 5000).unwrap(), b);
    assert_eq!(r.read(70_000, 3).unwrap(), vec![1, 2, 3]);
    assert_eq!(r.read(0, 65536).unwrap(), vec![0u8; 65536]);
    let ext = r.extents(0, 4 << 20);
    // 70_000 lies in the second cluster; the first and the rest up to 3 MiB are zeros.
    assert_eq!(
        ext[..3],
        [(65536, true), (65536, false), ((3 << 20) - 131072, true)],
        "{ext:?}"
    );
    assert!(r.read(size - 1, 2).is_err());
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

/// A one-cluster-table image whose header fields are set by `edit`.
fn image_with(name: &str, edit: impl FnOnce(&std::fs::File)) -> Result<Reader, Qcow2Error> {
    let (path, f) = temp(name);
    let w = Writer::create(f.try_clone().unwrap(), 1 << 20);
    w.write(0, &[5u8; 4096]).unwrap();
    w.finish().unwrap();
    edit(&f);
    let r = Reader::open(std::fs::File::open(&path).unwrap());
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    r
}

fn refusal(r: Result<Reader, Qcow2Error>) -> String {
    match r {
        Ok(_) => panic!("the image was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn images_this_code_cannot_read_are_refused_in_words() {
    let m = refusal(image_with("backing", |f| {
        f.write_all_at(&512u64.to_be_bytes(), 8).unwrap();
    }));
    assert!(
        m.contains("backing file") && m.contains("not supported yet"),
        "{m}"
    );
    let m = refusal(image_with("crypt", |f| {
        f.write_all_at(&1u32.to_be_bytes(), 32).unwrap();
    }));
    assert!(
        m.contains("encrypted") && m.contains("not supported yet"),
        "{m}"
    );
    let m = refusal(image_with("truncated", |f| f.set_len(40).unwrap()));
    assert!(m.contains("not a valid qcow2 image"), "{m}");
    let m = refusal(image_with("l1-outside", |f| {
        f.write_all_at(&(1u64 << 40).to_be_bytes(), 40).unwrap();
    }));
    assert!(
        m.contains("L1 table") && m.contains("outside the file"),
        "{m}"
    );
    let m = refusal(image_with("compressed", |f| {
        // The first L2 table is the cluster after the data cluster (header, L1, data).
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, 3 << 16).unwrap();
        let v = u64::from_be_bytes(e) | COMPRESSED;
        f.write_all_at(&v.to_be_bytes(), 3 << 16).unwrap();
    }));
    assert!(
        m.contains("compressed") && m.contains("not supported yet"),
        "{m}"
    );
    let m = refusal(image_with("extl2", |f| {
        f.write_all_at(&INCOMPAT_EXTL2.to_be_bytes(), 72).unwrap();
    }));
    assert!(m.contains("extended L2"), "{m}");
}
