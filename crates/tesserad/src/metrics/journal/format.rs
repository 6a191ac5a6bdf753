//! The metrics history file's format, pure (no I/O): a header line naming the format and
//! its version, then one line per point: 16 hex digits of the BLAKE3 hash of the JSON,
//! a space, the point as JSON (`tessera_api::MetricsPoint`), a newline.
//!
//! A line stands alone: a record torn by a crash or a full disk, a flipped byte or junk
//! fails its hash (or has no newline) and is skipped, and reading goes on at the next
//! newline, so one bad record costs only itself. Points must come in time order; one
//! that does not (written twice, or a clock set back) is skipped too.

use tessera_api::MetricsPoint;

/// The first line of a history file.
pub const HEADER: &str = "tessera-metrics-history 1\n";
/// How the header starts whatever the version: a file that starts so with another
/// version was written by another version of tesserad.
const MAGIC: &str = "tessera-metrics-history ";
/// Hex digits of the hash at the start of a record.
const SUM_LEN: usize = 16;

/// A file that is not a history this version reads.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("not a metrics history file (it does not start with {HEADER:?})")]
    NotAHistory,
    #[error("a metrics history of version {0:?}, not 1")]
    OtherVersion(String),
}

/// What a file held.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    /// The good points, in time order.
    pub points: Vec<MetricsPoint>,
    /// Records skipped (damaged, cut short, out of order).
    pub bad_records: usize,
    /// Bytes in them.
    pub bad_bytes: usize,
    /// Why the first of them was skipped.
    pub first_problem: Option<String>,
}

impl Decoded {
    fn skip(&mut self, line: &[u8], why: impl FnOnce() -> String) {
        self.bad_records += 1;
        self.bad_bytes += line.len();
        if self.first_problem.is_none() {
            self.first_problem = Some(why());
        }
    }
}

/// The hash of a record's JSON as its line carries it.
fn sum(json: &[u8]) -> String {
    let h = blake3::hash(json);
    h.as_bytes()[..SUM_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One record: its line, newline included.
pub fn encode(p: &MetricsPoint) -> Vec<u8> {
    // A MetricsPoint is numbers, strings and lists: serializing it cannot fail.
    let json = serde_json::to_vec(p).unwrap_or_default();
    let mut line = sum(&json).into_bytes();
    line.push(b' ');
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

/// A whole file holding `points`.
pub fn file(points: &[MetricsPoint]) -> Vec<u8> {
    let mut out = HEADER.as_bytes().to_vec();
    for p in points {
        out.extend(encode(p));
    }
    out
}

/// Reads a file's contents: every good record, and what was skipped. An empty file, or
/// one cut short within its header, holds no points.
pub fn decode(bytes: &[u8]) -> Result<Decoded, FormatError> {
    let mut out = Decoded::default();
    let Some(body) = bytes.strip_prefix(HEADER.as_bytes()) else {
        if HEADER.as_bytes().starts_with(bytes) {
            if !bytes.is_empty() {
                out.skip(bytes, || "the header is cut short".into());
            }
            return Ok(out);
        }
        if let Some(rest) = bytes.strip_prefix(MAGIC.as_bytes()) {
            let version = rest.split(|b| *b == b'\n').next().unwrap_or_default();
            return Err(FormatError::OtherVersion(
                String::from_utf8_lossy(&version[..version.len().min(32)]).into_owned(),
            ));
        }
        return Err(FormatError::NotAHistory);
    };
    let mut rest = body;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => {
                out.skip(rest, || "the last record is cut short".into());
                break;
            }
        };
        rest = next;
        match record(line) {
            Ok(p) if out.points.last().is_none_or(|l| l.t_ms < p.t_ms) => out.points.push(p),
            Ok(p) => {
                let t = p.t_ms;
                out.skip(line, || {
                    format!("a point at {t} ms is not after the one before")
                });
            }
            Err(why) => out.skip(line, || why),
        }
    }
    Ok(out)
}

/// One line without its newline.
fn record(line: &[u8]) -> Result<MetricsPoint, String> {
    if line.len() <= SUM_LEN || line[SUM_LEN] != b' ' {
        return Err("a record without its hash".into());
    }
    let (given, json) = (&line[..SUM_LEN], &line[SUM_LEN + 1..]);
    if given != sum(json).as_bytes() {
        return Err("a record whose hash does not match".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("a record that is not a point: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tessera_api::{InterfaceRates, MetricsPoint};

    use super::*;

    fn point(t_ms: u64) -> MetricsPoint {
        MetricsPoint {
            t_ms,
            cpu_percent: 12.5,
            memory_used: 100 + t_ms,
            memory_total: 1 << 30,
            disk_used: 7,
            disk_total: 9,
            disk_read_bps: Some(1.5),
            disk_write_bps: None,
            net_rx_bps: Some(1e9),
            net_tx_bps: None,
            interfaces: vec![InterfaceRates {
                name: "eth0".into(),
                rx_bps: Some(3.0),
                tx_bps: None,
            }],
        }
    }

    fn points(n: u64) -> Vec<MetricsPoint> {
        (1..=n).map(|i| point(i * 10_000)).collect()
    }

    #[test]
    fn points_come_back_as_written() {
        let ps = points(5);
        let d = decode(&file(&ps)).unwrap();
        assert_eq!(
            d,
            Decoded {
                points: ps,
                ..Default::default()
            }
        );
        assert_eq!(decode(b"").unwrap(), Decoded::default());
        assert_eq!(decode(HEADER.as_bytes()).unwrap(), Decoded::default());
        // A point written by a version without per-interface rates reads as none.
        let mut old = serde_json::to_value(point(1)).unwrap();
        old.as_object_mut().unwrap().remove("interfaces");
        let json = serde_json::to_vec(&old).unwrap();
        let mut f = HEADER.as_bytes().to_vec();
        f.extend(format!("{} ", sum(&json)).bytes());
        f.extend(&json);
        f.push(b'\n');
        assert!(decode(&f).unwrap().points[0].interfaces.is_empty());
    }

    #[test]
    fn a_file_cut_anywhere_reads_up_to_its_last_whole_record() {
        let ps = points(4);
        let whole = file(&ps);
        let ends: Vec<usize> = (0..=ps.len())
            .map(|n| HEADER.len() + ps[..n].iter().map(|p| encode(p).len()).sum::<usize>())
            .collect();
        for cut in 0..=whole.len() {
            let d = decode(&whole[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let whole_records = ends.iter().filter(|e| **e <= cut).count().saturating_sub(1);
            assert_eq!(d.points, ps[..whole_records], "cut at {cut}");
            let clean = cut == 0 || ends.contains(&cut);
            assert_eq!(d.bad_records, usize::from(!clean), "cut at {cut}");
            let expected_bad = if cut < HEADER.len() {
                cut
            } else {
                cut - ends[whole_records]
            };
            assert_eq!(d.bad_bytes, expected_bad, "cut at {cut}");
        }
    }

    #[test]
    fn damaged_records_are_skipped_and_the_rest_read() {
        let ps = points(5);
        let mut f = file(&ps);
        // A flipped bit in the second record's JSON, junk (no newline) torn into the
        // middle, a duplicate, and junk at the end.
        let second = HEADER.len() + encode(&ps[0]).len() + SUM_LEN + 10;
        f[second] ^= 0x01;
        let third = HEADER.len() + encode(&ps[0]).len() + encode(&ps[1]).len();
        f.splice(third..third, b"\x00\xff{\"t_ms\": 3".iter().copied());
        f.extend(encode(&ps[4]));
        f.extend(b"garbage\n\n\xde\xad\xbe\xef");
        let d = decode(&f).unwrap();
        let times: Vec<u64> = d.points.iter().map(|p| p.t_ms).collect();
        // The third record shares its line with the junk before it: both lost.
        assert_eq!(times, [10_000, 40_000, 50_000]);
        assert_eq!(d.bad_records, 6, "{d:?}");
        assert_eq!(
            d.first_problem.as_deref(),
            Some("a record whose hash does not match")
        );
        // A record whose hash matches but is no point.
        let json = br#"{"t_ms": "soon"}"#;
        let mut g = HEADER.as_bytes().to_vec();
        g.extend(format!("{} ", sum(json)).bytes());
        g.extend(json);
        g.push(b'\n');
        g.extend(encode(&ps[0]));
        let d = decode(&g).unwrap();
        assert_eq!(d.points, ps[..1]);
        assert!(d
            .first_problem
            .unwrap()
            .starts_with("a record that is not a point"));
    }

    #[test]
    fn other_files_are_refused_with_what_they_are() {
        assert_eq!(
            decode(b"\x7fELF\x02\x01").unwrap_err(),
            FormatError::NotAHistory
        );
        assert_eq!(
            decode(b"tessera-metrics-history 2\nwhatever\n").unwrap_err(),
            FormatError::OtherVersion("2".into())
        );
        assert!(
            decode(b"tessera-met").unwrap().points.is_empty(),
            "a cut header"
        );
        // Random bytes after a good header: no panic, nothing read.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut noise = HEADER.as_bytes().to_vec();
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            noise.push(state as u8);
        }
        let d = decode(&noise).unwrap();
        assert!(d.points.is_empty());
        assert!(d.bad_records > 0);
        let newlines = noise[HEADER.len()..]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        assert_eq!(
            d.bad_bytes + newlines + HEADER.len(),
            noise.len(),
            "every byte is counted"
        );
    }
}
