//! Credentials for NBD over TLS: a client certificate from the cluster CA for the calling
//! operator (`tessera volume export-creds`), so real NBD clients (qemu, libnbd) can reach
//! a store's TCP port, which serves nobody without one.

use axum::extract::State;
use axum::Json;
use tessera_api::NbdCredentials;

use super::events::event;
use super::extract::{Auth, Operator, Synced};
use super::{commit, ApiError, ErrorBody, St};

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
    let node = n.0.clone();
    let user = p.user.clone();
    // Opening the sealed CA key derives a key with argon2id the first time: off the async
    // workers, like the issue itself (key generation).
    let issued = tokio::task::spawn_blocking(move || {
        let ca = node
            .cluster_ca()
            .map_err(|e| ApiError::internal(format!("cannot open the cluster CA: {e}")))?
            .ok_or_else(|| {
                ApiError::unavailable("the cluster CA is not in the cluster state yet")
            })?;
        let (cert, key) = ca
            .issue_client(&user)
            .map_err(|e| ApiError::internal(format!("cannot issue the certificate: {e}")))?;
        Ok::<_, ApiError>((ca.cert_pem, cert, key))
    })
    .await
    .map_err(|e| ApiError::internal(format!("issuing the certificate failed: {e}")))??;
    let (ca_cert_pem, client_cert_pem, client_key_pem) = issued;
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
        ca_cert_pem,
        client_cert_pem,
        client_key_pem,
        valid_days: tessera_pki::CLIENT_CERT_DAYS as u32,
    }))
}
