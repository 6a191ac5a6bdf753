//! Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP, HMAC-SHA1, 30 s steps,
//! 6 digits: what authenticator apps use by default), free of I/O: codes, verification
//! with one step of clock skew either way and replay refusal, and the `otpauth://` URI
//! apps enroll from.

use data_encoding::BASE32_NOPAD;
use ring::hmac;

/// Seconds per step.
pub const STEP_S: u64 = 30;
/// Digits per code.
pub const DIGITS: u32 = 6;

/// The HOTP value of `secret` at counter `step` (RFC 4226 section 5.3), `digits` long.
pub fn hotp(secret: &[u8], step: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &step.to_be_bytes());
    let h = mac.as_ref();
    let offset = usize::from(h[h.len() - 1] & 0x0f);
    let bin = u32::from_be_bytes([
        h[offset] & 0x7f,
        h[offset + 1],
        h[offset + 2],
        h[offset + 3],
    ]);
    bin % 10u32.pow(digits)
}

/// The step of Unix time `now_s`.
pub fn step_of(now_s: u64) -> u64 {
    now_s / STEP_S
}

/// The step whose code `code` is, if it is the code of the current step or the one
/// before or after (clock skew), and later than `last_used` (a code is accepted once).
pub fn verify(secret: &[u8], code: &str, now_s: u64, last_used: Option<u64>) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let want: u32 = code.parse().ok()?;
    let now = step_of(now_s);
    let mut found = None;
    // Every candidate is computed, so the time taken does not tell which matched.
    for step in [now.saturating_sub(1), now, now + 1] {
        if hotp(secret, step, DIGITS) == want && last_used.is_none_or(|l| step > l) {
            found = Some(step);
        }
    }
    found
}

/// The secret as authenticator apps take it typed in (base32, no padding).
pub fn base32(secret: &[u8]) -> String {
    BASE32_NOPAD.encode(secret)
}

/// The `otpauth://totp/...` URI an app enrolls from (usually shown as a QR code).
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_S}",
        enc(issuer),
        enc(account),
        base32(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn codes_are_rfc_6238s_sha1_test_vectors() {
        // RFC 6238 appendix B (8 digits), and its last six digits.
        for (t, code) in [
            (59u64, 94287082u32),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(RFC_SECRET, step_of(t), 8), code, "t={t}");
            assert_eq!(hotp(RFC_SECRET, step_of(t), 6), code % 1_000_000, "t={t}");
        }
    }

    #[test]
    fn a_code_is_accepted_one_step_either_way_and_only_once() {
        let now = 1_700_000_015;
        let code = |step: u64| format!("{:06}", hotp(RFC_SECRET, step, 6));
        let s = step_of(now);
        assert_eq!(verify(RFC_SECRET, &code(s), now, None), Some(s));
        assert_eq!(verify(RFC_SECRET, &code(s - 1), now, None), Some(s - 1));
        assert_eq!(verify(RFC_SECRET, &code(s + 1), now, None), Some(s + 1));
        assert_eq!(verify(RFC_SECRET, &code(s - 2), now, None), None);
        assert_eq!(verify(RFC_SECRET, &code(s + 2), now, None), None);
        // Used: the same code again, or an older one, is refused.
        assert_eq!(verify(RFC_SECRET, &code(s), now, Some(s)), None);
        assert_eq!(verify(RFC_SECRET, &code(s - 1), now, Some(s)), None);
        assert_eq!(verify(RFC_SECRET, &code(s + 1), now, Some(s)), Some(s + 1));
        for bad in ["", "12345", "1234567", "12a456", "-12345"] {
            assert_eq!(verify(RFC_SECRET, bad, now, None), None, "{bad:?}");
        }
    }

    #[test]
    fn the_uri_carries_the_secret_in_base32() {
        let u = otpauth_uri("Tessera lab", "alice@corp", RFC_SECRET);
        assert!(
            u.starts_with("otpauth://totp/Tessera%20lab:alice@corp?secret="),
            "{u}"
        );
        assert!(u.contains("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"), "{u}");
        assert!(u.contains("&digits=6&period=30"), "{u}");
    }
}
