//! What a failed write through the replicated state means for the caller, in words
//! without Raft's internals.

/// What a failed write through the replicated state means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// Not applied: a retry as is cannot do it twice.
    NotApplied,
    /// Perhaps applied: the write reached the leader, or a connection that was on its way
    /// to it, and the answer was lost (the leader stopped, the connection broke, the time
    /// ran out). The leader may have committed it.
    Unknown,
    /// Committed by the leader; this node had not caught up in time to answer with it.
    Committed,
}

impl WriteFailure {
    /// The answer's words: what happened and what to do, without Raft's internals (node
    /// structs, addresses, log ids), which only the daemon's log gets.
    pub fn message(self) -> &'static str {
        match self {
            WriteFailure::NotApplied => {
                "the cluster could not take the change now (no leader reachable, or the \
                 leader changed); nothing was changed; try again"
            }
            WriteFailure::Unknown => {
                "outcome unknown: the cluster's leader stopped answering while the change was \
                 under way, so it may or may not have been made; read the resource (or retry \
                 with the same Idempotency-Key) before doing it again"
            }
            WriteFailure::Committed => {
                "the change was made, but this node has not caught up with it yet; read it \
                 again in a moment"
            }
        }
    }
}

/// Classifies a failed [`Node::write`](tessera_state::Node::write). Only refusals before anything left this node are
/// [`WriteFailure::NotApplied`]: a write forwarded to the leader can have been committed
/// by it for most errors that come back. (`Node::write` sends a write whose answer was
/// lost again, for up to `tessera_state::RESEND_FOR`, to whichever member leads: its id
/// makes a second sending change nothing, `tessera_state::once`. What comes back here
/// is the last sending's error, when no sending got an answer in that time.)
pub fn write_failure(e: &tessera_state::StateError) -> WriteFailure {
    use tessera_state::{StateError, TransportError};
    match e {
        StateError::NoLeader(_) => WriteFailure::NotApplied,
        StateError::Forward(TransportError::Encode(_) | TransportError::Pki(_)) => {
            WriteFailure::NotApplied
        }
        StateError::Forward(_) => WriteFailure::Unknown,
        // On the leader itself: it may have appended the entry before failing.
        StateError::Write(_) => WriteFailure::Unknown,
        StateError::Lagging => WriteFailure::Committed,
        _ => WriteFailure::Unknown,
    }
}

/// The words for a failed read barrier ([`Node::sync`](tessera_state::Node::sync)), without Raft's internals.
pub fn sync_failure(e: &tessera_state::StateError) -> &'static str {
    match e {
        tessera_state::StateError::Lagging => {
            "this node is behind the cluster's leader; try again in a moment"
        }
        _ => "the cluster state cannot be confirmed now (no leader reachable); try again",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_failures_are_told_apart_and_say_nothing_of_raft() {
        use tessera_state::{StateError, TransportError};
        let io = |kind| TransportError::Io {
            addr: "10.0.0.1:8007".into(),
            source: std::io::Error::from(kind),
        };
        let cases = [
            (
                StateError::Forward(io(std::io::ErrorKind::ConnectionRefused)),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(io(std::io::ErrorKind::ConnectionReset)),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(TransportError::Timeout {
                    addr: "10.0.0.1:8007".into(),
                }),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(TransportError::Refused {
                    addr: "10.0.0.1:8007".into(),
                    message: "has to forward request to: Some(2), Some(BasicNode { addr: \"x\" })"
                        .into(),
                }),
                WriteFailure::Unknown,
            ),
            (
                StateError::Forward(TransportError::Unanswered {
                    addr: "10.0.0.1:8007".into(),
                    source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                }),
                WriteFailure::Unknown,
            ),
            (
                StateError::NoLeader(tessera_state::LeaderError::NoLeader),
                WriteFailure::NotApplied,
            ),
            (StateError::Lagging, WriteFailure::Committed),
        ];
        for (e, want) in cases {
            let got = write_failure(&e);
            assert_eq!(got, want, "{e}");
            let m = got.message();
            for internal in ["BasicNode", "raft", "Raft", "8007", "Some("] {
                assert!(!m.contains(internal), "{m}");
            }
            assert!(!sync_failure(&e).contains("raft"));
        }
        assert!(WriteFailure::Unknown
            .message()
            .starts_with("outcome unknown"));
    }
}
