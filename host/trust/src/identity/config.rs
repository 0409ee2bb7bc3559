//! The `[identity]` settings and the name rules SPIFFE IDs impose.

use std::path::PathBuf;
use std::time::Duration;

/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "edgeward.local";
/// Default X509-SVID lifetime (1 hour).
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default maximum JWT-SVID lifetime (5 minutes).
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(300);
/// Default JWT working-key rotation period (1 hour).
pub const DEFAULT_JWT_KEY_ROTATION: Duration = Duration::from_secs(3600);
/// The `[identity]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// SPIFFE trust domain (default `edgeward.local`).
    pub trust_domain: String,
    /// This device's id in SPIFFE IDs (default: the hostname).
    pub device_id: String,
    /// X509-SVID lifetime (default 1 h).
    pub svid_ttl: Duration,
    /// Longest JWT-SVID lifetime; requests are clamped to it (default 5 min).
    pub max_token_ttl: Duration,
    /// How long a JWT working key signs before it is replaced (default 1 h).
    pub jwt_key_rotation: Duration,
    /// A certificate for the HSM's `device-ca` key (PEM: that certificate,
    /// then its issuers up to a self-signed root). Default: a self-signed
    /// root kept in the state directory.
    pub ca_certificate: Option<PathBuf>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            device_id: default_device_id(),
            svid_ttl: DEFAULT_SVID_TTL,
            max_token_ttl: DEFAULT_MAX_TOKEN_TTL,
            jwt_key_rotation: DEFAULT_JWT_KEY_ROTATION,
            ca_certificate: None,
        }
    }
}

/// The hostname, with characters a SPIFFE path segment cannot hold replaced
/// by `-` (`localhost` if it is empty).
pub fn default_device_id() -> String {
    let uname = rustix::system::uname();
    let raw = uname.nodename().to_string_lossy();
    let id: String = raw
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() || id == "." || id == ".." {
        "localhost".to_owned()
    } else {
        id
    }
}

/// A SPIFFE trust domain: 1-255 of `a-z 0-9 . - _`.
pub fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'_')
        })
}

/// A SPIFFE path segment: 1-128 of `A-Z a-z 0-9 . - _`, not `.` or `..`.
pub fn valid_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

impl IdentityConfig {
    /// Checks the fields.
    ///
    /// # Errors
    ///
    /// A message naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !valid_trust_domain(&self.trust_domain) {
            return Err(format!(
                "identity.trust_domain {:?}: use 1-255 of a-z 0-9 . - _",
                self.trust_domain
            ));
        }
        if !valid_path_segment(&self.device_id) {
            return Err(format!(
                "identity.device_id {:?}: use 1-128 of A-Z a-z 0-9 . - _ (not . or ..)",
                self.device_id
            ));
        }
        let check = |name: &str, d: Duration, min: u64, max: u64| {
            if (min..=max).contains(&d.as_secs()) {
                Ok(())
            } else {
                Err(format!(
                    "identity.{name}: must be between {min}s and {max}s"
                ))
            }
        };
        check("svid_ttl", self.svid_ttl, 2, 30 * 24 * 3600)?;
        check("max_token_ttl", self.max_token_ttl, 1, 24 * 3600)?;
        check("jwt_key_rotation", self.jwt_key_rotation, 1, 30 * 24 * 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_trust_domain("edgeward.local"));
        assert!(!valid_trust_domain("Edgeward.local"));
        assert!(!valid_trust_domain(""));
        assert!(valid_path_segment("Sensor-1.a_b"));
        assert!(!valid_path_segment(".."));
        assert!(!valid_path_segment("a/b"));
        assert!(valid_path_segment(&default_device_id()));
    }

    #[test]
    fn config_limits() {
        let mut c = IdentityConfig::default();
        assert!(c.check().is_ok());
        c.svid_ttl = Duration::from_secs(1);
        assert!(c.check().unwrap_err().contains("svid_ttl"));
    }
}
