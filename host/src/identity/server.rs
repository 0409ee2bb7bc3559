//! Server certificates: which names a module may get one for, and how
//! often (each is an HSM signature).

use std::net::IpAddr;

use super::authority::Profile;
use super::module::Credentials;
use super::{
    IdentityError, MAX_ALT_NAMES, ModuleIdentity, SERVER_CERT_BURST, SERVER_CERT_RATE, invalid,
};

/// Checks a DNS name for a server certificate: LDH labels, no wildcard.
fn check_dns_name(name: &str) -> Result<(), IdentityError> {
    let bad = |why: &str| invalid(format!("alt-names: {name:?} {why}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1-253 bytes"));
    }
    if name.starts_with("*.") {
        return Err(bad("is a wildcard; name each host"));
    }
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("has an empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad("is not a DNS name or IP address"));
        }
    }
    Ok(())
}

impl ModuleIdentity {
    /// A server certificate for `common_name` and `alt_names` (DNS names or
    /// IP addresses), with a fresh key. Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// Invalid names, HSM errors.
    pub fn server_certificate(
        &self,
        common_name: &str,
        alt_names: &[String],
    ) -> Result<Credentials, IdentityError> {
        if common_name.is_empty()
            || common_name.len() > 64
            || common_name.chars().any(char::is_control)
        {
            return Err(invalid(
                "common-name: must be 1-64 bytes without control characters",
            ));
        }
        if alt_names.len() > MAX_ALT_NAMES {
            return Err(invalid(format!(
                "alt-names: {} names; the limit is {MAX_ALT_NAMES}",
                alt_names.len()
            )));
        }
        let mut names = Vec::with_capacity(alt_names.len());
        for n in alt_names {
            if let Ok(ip) = n.parse::<IpAddr>() {
                names.push(rcgen::SanType::IpAddress(ip));
            } else {
                check_dns_name(n)?;
                names.push(rcgen::SanType::DnsName(n.as_str().try_into().map_err(
                    |_| invalid(format!("alt-names: {n:?} is not a DNS name")),
                )?));
            }
        }
        self.take_server_cert_token()?;
        let leaf = self.service.authority().issue_leaf(
            &Profile::Server {
                common_name: common_name.to_owned(),
                names,
            },
            &self.who.spiffe_id,
            common_name,
            self.service.config().svid_ttl,
        )?;
        Ok(Credentials::from(&leaf))
    }

    fn take_server_cert_token(&self) -> Result<(), IdentityError> {
        let mut b = self
            .server_certs
            .lock()
            .map_err(|_| IdentityError::Internal("rate limiter lock poisoned".into()))?;
        let now = std::time::Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * SERVER_CERT_RATE;
        *b = ((b.0 + refill).min(SERVER_CERT_BURST), now);
        if b.0 < 1.0 {
            return Err(IdentityError::Unavailable(format!(
                "server-certificate rate limit: {SERVER_CERT_BURST} at once, then {SERVER_CERT_RATE} per second; retry later"
            )));
        }
        b.0 -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert!(check_dns_name("api.example.com").is_ok());
        assert!(check_dns_name("*.example.com").is_err());
        assert!(check_dns_name("-a.example").is_err());
        assert!(check_dns_name("a..b").is_err());
    }
}
