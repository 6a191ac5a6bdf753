//! Part of `devcluster`: `tessera volume cp` with `vol:` ends on the running local
//! cluster — found through the API, a client certificate asked of it, the data carried by
//! the primary's store's QUIC export (UDP, the NBD port's number).

use std::os::unix::fs::FileExt;

use tessera_tests::file_hash;

use super::cli;

/// A file copied into a replicated volume and back is identical; a snapshot copies; an
/// unknown volume is refused by the API lookup.
pub fn check_volume_cp(h: &std::path::Path) {
    let (src, back, snap) = (
        h.join("cp-src.raw"),
        h.join("cp-back.raw"),
        h.join("cp-s1.raw"),
    );
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    let mut x = blake3::Hasher::new().update(b"volume cp").finalize_xof();
    for at in [0u64, 17 << 20, (64 << 20) - (1 << 20)] {
        let mut piece = vec![0u8; 1 << 20];
        x.fill(&mut piece);
        f.write_all_at(&piece, at).unwrap();
    }
    let path = |p: &std::path::Path| p.display().to_string();
    let (ok, out, err) = cli(h, &["volume", "cp", &path(&src), "vol:vol2"], "");
    assert!(
        ok && out.contains("skipped as zeros"),
        "cp into vol:vol2: {out}{err}"
    );
    let (ok, out, err) = cli(h, &["volume", "cp", "vol:vol2", &path(&back)], "");
    assert!(ok, "cp from vol:vol2: {out}{err}");
    assert_eq!(file_hash(&src), file_hash(&back), "vol2 read back differs");
    let (ok, out, err) = cli(h, &["volume", "cp", "vol:vol1@s1", &path(&snap)], "");
    assert!(ok, "cp from vol:vol1@s1: {out}{err}");
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), 64 << 20);
    let (ok, _, err) = cli(h, &["volume", "cp", "vol:no-such", &path(&snap)], "");
    assert!(!ok && err.contains("404"), "{err}");
}
