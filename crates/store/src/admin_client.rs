//! A blocking client of the admin socket, used by the `tessera-store` CLI and by `tesserad`'s
//! task runner.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tessera_store_admin::{
    AdminError, AdminOp, AdminReply, AdminRequest, AdminResponse, Outcome, ADMIN_VERSION,
};

/// Errors talking to the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Could not reach or talk to the daemon.
    #[error("admin socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something we do not understand.
    #[error("unexpected reply from tessera-store: {0}")]
    Protocol(String),
    /// The daemon refused the operation.
    #[error("{0}")]
    Refused(AdminError),
}

/// A connection to a store's admin socket.
pub struct AdminClient {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AdminClient {
    /// Connects to the admin socket at `path`.
    pub fn connect(path: &Path) -> Result<AdminClient, AdminClientError> {
        let p = path.display().to_string();
        let io = |source| AdminClientError::Io {
            path: p.clone(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        let writer = s.try_clone().map_err(io)?;
        Ok(AdminClient {
            path: p.clone(),
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Gives up on a send or a reply that takes longer than `timeout` (`None`: waits as
    /// long as it takes, the default). A poller sets one so a hung store cannot hang it.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), AdminClientError> {
        let s = self.reader.get_ref();
        s.set_read_timeout(timeout)
            .and_then(|()| s.set_write_timeout(timeout))
            .map_err(|source| AdminClientError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Sends one operation and waits for its reply.
    pub fn call(&mut self, op: AdminOp) -> Result<AdminReply, AdminClientError> {
        let io = |source| AdminClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(&AdminRequest {
            v: ADMIN_VERSION,
            op,
        })
        .map_err(|e| AdminClientError::Protocol(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).map_err(io)?;
        if n == 0 {
            return Err(AdminClientError::Protocol("connection closed".into()));
        }
        let resp: AdminResponse = serde_json::from_str(&reply)
            .map_err(|e| AdminClientError::Protocol(format!("{e}: {reply}")))?;
        match resp.outcome {
            Outcome::Ok(r) => Ok(r),
            Outcome::Error(e) => Err(AdminClientError::Refused(e)),
        }
    }
}
