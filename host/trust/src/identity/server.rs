//! Server certificates: for the names the module's registration allows
//! (its `server_names`, deny by default), and not too often (each is an
//! HSM signature).

use std::net::IpAddr;

use super::authority::Profile;
use super::module::Credentials;
use super::{
    IdentityError, MAX_ALT_NAMES, ModuleIdentity, SERVER_CERT_BURST, SERVER_CERT_RATE, invalid,
};
use crate::addrclass::check_dns_name;

/// Checks a requested DNS name: LDH labels, no wildcard.
fn check_requested_dns(what: &str, name: &str) -> Result<(), IdentityError> {
    if name.starts_with("*.") {
        return Err(invalid(format!(
            "{what}: {name:?} is a wildcard; name each host"
        )));
    }
    check_dns_name(name).map_err(|why| invalid(format!("{what}: {name:?} {why}")))
}

fn not_permitted(what: &str, name: &str) -> IdentityError {
    IdentityError::NotPermitted(format!(
        "{what}: {name:?} is not among this module's server_names"
    ))
}

impl ModuleIdentity {
    /// A server certificate for `common_name` and `alt_names` (DNS names or
    /// IP addresses), with a fresh key. Every name, the common name
    /// included, must be allowed by the registration's `server_names`.
    /// Blocks on the HSM.
    ///
    /// # Errors
    ///
    /// Invalid names; [`IdentityError::NotPermitted`] naming the first name
    /// the registration does not allow; the rate limit; HSM errors.
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
                let ip = ip.to_canonical();
                if !self.server_names.permits_ip(ip) {
                    return Err(not_permitted("alt-names", n));
                }
                names.push(rcgen::SanType::IpAddress(ip));
            } else {
                check_requested_dns("alt-names", n)?;
                if !self.server_names.permits_dns(n) {
                    return Err(not_permitted("alt-names", n));
                }
                names.push(rcgen::SanType::DnsName(n.as_str().try_into().map_err(
                    |_| invalid(format!("alt-names: {n:?} is not a DNS name")),
                )?));
            }
        }
        // The common name is what legacy clients check: it must be an
        // allowed DNS name too.
        check_requested_dns("common-name", common_name)?;
        if !self.server_names.permits_dns(common_name) {
            return Err(not_permitted("common-name", common_name));
        }
        // The organisation's constraints on the device CA: a name outside
        // them would give a certificate no one verifies, so say so.
        if let Some(limits) = self.service.authority().limits() {
            let outside = |n: &str| {
                IdentityError::NotPermitted(format!(
                    "{n:?} is outside the device CA's name constraints (set by the organisation that certified it)"
                ))
            };
            for n in &names {
                match n {
                    rcgen::SanType::IpAddress(ip) if !limits.permits_ip(*ip) => {
                        return Err(outside(&ip.to_string()));
                    }
                    rcgen::SanType::DnsName(d) if !limits.permits_dns(d.as_str()) => {
                        return Err(outside(d.as_str()));
                    }
                    _ => {}
                }
            }
            if !limits.permits_dns(common_name) {
                return Err(outside(common_name));
            }
        }
        self.take_server_cert_token()?;
        let leaf = self.service.authority().issue_leaf(
            &Profile::Server {
                common_name: common_name.to_owned(),
                names,
            },
            &self.who.spiffe_id,
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
    fn requested_dns_names() {
        assert!(check_requested_dns("x", "api.example.com").is_ok());
        assert!(check_requested_dns("x", "*.example.com").is_err());
        assert!(check_requested_dns("x", "-a.example").is_err());
        assert!(check_requested_dns("x", "a..b").is_err());
        let e = check_requested_dns("alt-names", "bad name").unwrap_err();
        assert!(e.to_string().contains("not a DNS name"), "{e}");
    }
}
