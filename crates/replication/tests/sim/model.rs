//! The simulation's pieces that are not the driver: a replica's disk as volatile and
//! durable block contents, and helpers to look into frames.

use tessera_replication::replica::Op;
use tessera_replication::wire::{decode_body, frame_body_len, Generation, Message};

use super::{BLOCK, BLOCKS};

#[derive(Clone)]
pub(super) struct Disk {
    /// Per block: the id of the write whose data it holds (0: never written).
    pub(super) volatile: Vec<u64>,
    pub(super) durable: Vec<u64>,
}

impl Disk {
    pub(super) fn new() -> Disk {
        Disk {
            volatile: vec![0; BLOCKS],
            durable: vec![0; BLOCKS],
        }
    }

    pub(super) fn apply(&mut self, op: &Op, flush_works: bool) {
        match op {
            Op::Write { offset, fua, data } => {
                for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
                    let b = (*offset / BLOCK) as usize + i;
                    let id = write_id(chunk);
                    self.volatile[b] = id;
                    if *fua {
                        self.durable[b] = id;
                    }
                }
            }
            Op::Flush => {
                if flush_works {
                    self.durable = self.volatile.clone();
                }
            }
            Op::WriteZeroes { .. } | Op::Trim { .. } | Op::Snapshot { .. } | Op::Resize { .. } => {
                unreachable!("the simulation only writes and flushes")
            }
        }
    }
}

pub(super) fn trace() -> bool {
    std::env::var_os("TESSERA_SIM_TRACE").is_some()
}

pub(super) fn short(s: &str) -> String {
    s.chars().take(160).collect()
}

pub(super) fn decode(frame: &[u8]) -> Result<Message, String> {
    let mut prefix = [0; 4];
    prefix.copy_from_slice(&frame[..4]);
    let len = frame_body_len(prefix).map_err(|e| e.to_string())?;
    if len != frame.len() - 4 {
        return Err("frame length mismatch".into());
    }
    decode_body(&frame[4..]).map_err(|e| e.to_string())
}

pub(super) fn sequenced(msg: &Message) -> Option<u64> {
    match msg {
        Message::Write { seq, .. }
        | Message::WriteZeroes { seq, .. }
        | Message::Trim { seq, .. }
        | Message::Flush { seq, .. } => Some(*seq),
        _ => None,
    }
}

pub(super) fn msg_generation(msg: &Message) -> Option<Generation> {
    match msg {
        Message::Fence { generation, .. }
        | Message::Write { generation, .. }
        | Message::WriteZeroes { generation, .. }
        | Message::Trim { generation, .. }
        | Message::Flush { generation, .. }
        | Message::Digests { generation, .. }
        | Message::Read { generation, .. } => Some(*generation),
        _ => None,
    }
}

/// The id a simulated write stamps on every 8 bytes of its blocks.
pub(super) fn write_id(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().expect("a block holds 8 bytes"))
}
