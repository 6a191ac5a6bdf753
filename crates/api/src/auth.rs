//! Login, password change and API tokens.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a principal may do. Ordered: Auditor < Operator < Administrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read everything.
    Auditor,
    /// Read, and operate resources.
    Operator,
    /// Everything, including users and tokens.
    Administrator,
}

/// Credentials to log in with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Login {
    /// User name.
    #[schema(min_length = 1, max_length = 63)]
    pub username: String,
    /// Password.
    #[schema(min_length = 1, max_length = 1024)]
    pub password: String,
    /// The second factor, for a user who enrolled one: the authenticator app's six
    /// digits, or one of the recovery codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 64)]
    pub totp: Option<String>,
}

/// A new session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoginReply {
    /// The session secret: send it as `Authorization: Bearer <token>`.
    pub token: String,
    /// When it expires (ms since the epoch).
    pub expires_ms: u64,
    /// Whether the password must be changed before anything else.
    pub must_change_password: bool,
}

/// Who is calling (`GET /api/v1/session`): the user and role of the credentials the
/// request carried, so a client need not guess its rights by trying calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    /// The user (`name`, or `name@realm` for a directory user).
    pub user: String,
    /// The realm the user belongs to: `local`, or the directory realm's name.
    pub realm: String,
    /// The role in effect: the smaller of the credentials' role and the user's role now.
    pub role: Role,
    /// `session` (a login) or `token` (an API token).
    pub kind: String,
    /// When these credentials stop working (ms since the epoch).
    pub expires_ms: u64,
    /// Whether the password must be changed before anything else.
    pub must_change_password: bool,
}

/// The answer to a logout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoggedOut {
    /// The user whose session ended.
    pub logged_out: String,
}

/// A password change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct PasswordChange {
    /// The current password.
    #[schema(min_length = 1, max_length = 1024)]
    pub old_password: String,
    /// 12 to 1024 characters, no control characters.
    #[schema(
        min_length = 12,
        max_length = 1024,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub new_password: String,
}

/// The answer to a password change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PasswordChanged {
    /// Always true.
    pub changed: bool,
}

/// A new API token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct NewToken {
    /// Its role (at most the caller's).
    pub role: Role,
    /// Lifetime in seconds, 60 to 31622400 (366 days).
    #[serde(deserialize_with = "crate::strict::int")]
    #[schema(minimum = 60, maximum = 31622400)]
    pub expires_in_s: u64,
}

/// An API token; the secret is only shown when it is created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    /// Token id.
    pub id: String,
    /// Whose.
    pub user: String,
    /// Its role.
    pub role: Role,
    /// When it expires (ms since the epoch).
    pub expires_ms: u64,
    /// Only in the reply to its creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The answer to a token revocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    /// The token id.
    pub revoked: String,
}

crate::object_only!(Login, PasswordChange, NewToken);
