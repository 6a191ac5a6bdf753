//! Credentials for NBD over TLS: a client certificate from the cluster CA for the calling
//! operator (`tessera volume export-creds`), so real NBD clients (qemu, libnbd) can reach
//! a store's TCP port, which serves nobody without one.

use axum::extract::State;
use axum::Json;
use tessera_api::NbdCredentials;

use super::events::event;
use super::extract::{Auth, Operator, Synced};
use super::{commit, read, ApiError, ErrorBody, St};

/// Issue an NBD client certificate and key for the caller (Operator role): valid for
/// every volume's NBD export on every node, for `valid_days`. The key is made by the node
/// answering (which holds the cluster CA) and sent over this HTTPS connection only; the
/// issue is recorded as an event.
#[utoipa::path(post, path = "/api/v1/nbd/credentials", tag = "volumes",
    operation_id = "export_nbd_credentials",
    security(("token" = []), ("cookie" = [])),
    responses((status = 200, body = NbdCredentials), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn export_creds(
    State(st): St,
    p: Auth<Operator>,
    n: Synced,
) -> Result<Json<NbdCredentials>, ApiError> {
    let rec: serde_json::Value = read(&n, "pki", "ca")?
        .ok_or_else(|| ApiError::unavailable("the cluster CA is not in the cluster state yet"))?;
    let ca = crate::replicated::ca_of_record(&rec)
        .map_err(|e| ApiError::internal(format!("the cluster CA record is unusable: {e}")))?;
    let (client_cert_pem, client_key_pem) = ca
        .issue_client(&p.user)
        .map_err(|e| ApiError::internal(format!("cannot issue the certificate: {e}")))?;
    commit(
        &st,
        vec![],
        vec![event(
            "nbd.credentials",
            &p.user,
            &p.user,
            &format!(
                "NBD client certificate issued (valid {} days)",
                tessera_pki::CLIENT_CERT_DAYS
            ),
        )],
        |_| String::new(),
    )
    .await?;
    tracing::info!(user = %p.user, "issued an NBD client certificate");
    Ok(Json(NbdCredentials {
        user: p.user.clone(),
        ca_cert_pem: ca.cert_pem,
        client_cert_pem,
        client_key_pem,
        valid_days: tessera_pki::CLIENT_CERT_DAYS as u32,
    }))
}
