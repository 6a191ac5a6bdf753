//! The connections primaries opened to this store, by volume: the way back to a volume's
//! primary for a repair (`from_primary.rs`). A replica is never told its primary's
//! address; the primary connects to it and fences it first on every stream it writes
//! through, so a fence names the volume, the generation and (by its certificate) the
//! node, and its connection is the path a repair's `Read` takes back.

use std::collections::HashMap;

use parking_lot::Mutex;

/// At most this many connections are remembered per volume (the primary's link, a
/// catch-up's, and ones of a previous primary until they close).
const KEPT: usize = 4;

/// One connection a primary fenced a volume through.
#[derive(Clone)]
struct Seen {
    node: String,
    generation: u64,
    /// Order of first sight: the primary's link is older than a catch-up pass's stream.
    first: u64,
    conn: quinn::Connection,
}

/// The connections primaries fenced each volume through.
#[derive(Default)]
pub(super) struct PrimaryConns {
    inner: Mutex<(u64, HashMap<String, Vec<Seen>>)>,
}

impl PrimaryConns {
    /// Node `node` fenced `volume` in `generation` through `conn`.
    pub(super) fn note(&self, volume: &str, node: &str, generation: u64, conn: &quinn::Connection) {
        let mut g = self.inner.lock();
        let (counter, map) = &mut *g;
        let list = map.entry(volume.to_string()).or_default();
        list.retain(|s| s.conn.close_reason().is_none());
        if let Some(s) = list
            .iter_mut()
            .find(|s| s.conn.stable_id() == conn.stable_id())
        {
            // A fence of a newer generation on the same link (the cluster reconfigured).
            s.generation = s.generation.max(generation);
            return;
        }
        *counter += 1;
        list.push(Seen {
            node: node.to_string(),
            generation,
            first: *counter,
            conn: conn.clone(),
        });
        if list.len() > KEPT {
            // The oldest generation, first seen earliest, goes.
            list.sort_by_key(|s| (std::cmp::Reverse(s.generation), s.first));
            list.truncate(KEPT);
        }
    }

    /// The open connections of `volume`'s primaries in `generation` or newer, the
    /// newest generation first and, within one, the longest known first (the primary's
    /// link before a catch-up pass's connection, which serves no repair).
    pub(super) fn candidates(
        &self,
        volume: &str,
        generation: u64,
    ) -> Vec<(String, quinn::Connection)> {
        let mut g = self.inner.lock();
        let Some(list) = g.1.get_mut(volume) else {
            return Vec::new();
        };
        list.retain(|s| s.conn.close_reason().is_none());
        let mut open: Vec<&Seen> = list.iter().filter(|s| s.generation >= generation).collect();
        open.sort_by_key(|s| (std::cmp::Reverse(s.generation), s.first));
        open.into_iter()
            .map(|s| (s.node.clone(), s.conn.clone()))
            .collect()
    }

    /// Forgets `volume` (no longer a replica here).
    pub(super) fn forget(&self, volume: &str) {
        self.inner.lock().1.remove(volume);
    }
}
