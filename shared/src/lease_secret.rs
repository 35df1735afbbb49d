//! The lease secret: a random value the scheduler makes at every grant and
//! hands only to the lease holder (in [`crate::messages::LeaseGrant`]). The
//! job record keeps only its SHA-256 ([`crate::job::Lease::secret_hash`]),
//! which the job's readers may see without learning the secret.
//!
//! The holder puts the secret in every report and in the report's
//! JetStream de-duplication id, and an external executor's token carries
//! it: a report or a token is the holder's only if the secret's hash is the
//! lease's. Nobody who reads the job (its session, epoch, bot) can forge
//! one, or pre-publish a de-duplication id that would make the stream drop
//! the holder's report.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Length of a secret in characters (lowercase hex of two random UUIDs:
/// 244 random bits from the OS random number generator).
pub const SECRET_LEN: usize = 64;

/// A fresh secret for one grant.
pub fn generate() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// The SHA-256 of `secret`, lowercase hex: what the lease keeps.
pub fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Whether `secret` is the one whose hash is `expected` (compared in time
/// that does not depend on where they differ).
pub fn matches(secret: &str, expected: &str) -> bool {
    let got = hash(secret);
    got.len() == expected.len()
        && got
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// What the de-duplication id carries instead of the secret itself (the
/// id shows in stream listings): a digest of the secret, distinct from
/// the lease's hash so the hash (which readers of the job may see) does
/// not give the id away.
pub fn dedup_tag(secret: &str) -> String {
    let mut tag = hash(&format!("warden-dedup:{secret}"));
    tag.truncate(32);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_distinct() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), SECRET_LEN);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn only_the_secret_matches_its_hash() {
        let s = generate();
        let h = hash(&s);
        assert_eq!(h.len(), 64);
        assert!(matches(&s, &h));
        assert!(!matches(&generate(), &h));
        assert!(!matches("", &h));
        assert!(!matches(&s, ""));
        // The hash itself is not the secret.
        assert!(!matches(&h, &h));
    }

    #[test]
    fn the_dedup_tag_is_neither_the_secret_nor_its_hash() {
        let s = generate();
        let tag = dedup_tag(&s);
        assert_eq!(tag.len(), 32);
        assert!(!hash(&s).starts_with(&tag));
        assert!(!s.contains(&tag));
        assert_eq!(tag, dedup_tag(&s));
    }
}
