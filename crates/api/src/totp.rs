//! Two-factor login: a TOTP authenticator (RFC 6238) per user, and recovery codes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A new, not yet confirmed, authenticator secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TotpEnrollment {
    /// `otpauth://totp/...`: what an authenticator app enrolls from (as a QR code).
    pub otpauth_uri: String,
    /// The secret in base32, for typing it in.
    pub secret: String,
}

/// A code from the authenticator app, confirming the enrollment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct TotpConfirm {
    /// Six digits.
    #[schema(pattern = "^[0-9]{6}$")]
    pub code: String,
}

/// The answer to a confirmed enrollment: recovery codes, shown this once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TotpConfirmed {
    /// Each works once in place of a code (`totp` at login); stored hashed only.
    pub recovery_codes: Vec<String>,
}

crate::object_only!(TotpConfirm);
