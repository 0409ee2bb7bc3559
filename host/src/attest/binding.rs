//! What a deployment's signature is bound to. A signed deployment manifest
//! names its **target** (`device:<id>`, `group:<name>` or `fleet`) and its
//! **expiry** (`expires`, RFC 3339 UTC), and the signature covers them with
//! the rest of the text under a domain-separation tag, so it cannot be
//! taken for any other kind of signature made with the same key. A device
//! applies only what is addressed to itself, to a group it is in, or to the
//! whole fleet, arriving where such a deployment belongs, before it
//! expires. Versions (ordering, replay) are checked by the caller, which
//! knows what was applied before.

use std::fmt;
use std::str::FromStr;

use crate::api::Deployment;

/// Prefixes the SHA-256 of a manifest's text in what a deployment key
/// signs: a deployment signature verifies as nothing else, and nothing
/// else (a component's, a token's) verifies as a deployment's.
pub const DEPLOYMENT_DOMAIN: &[u8] = b"edgeward deployment manifest v1\0";

/// For whom a deployment is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One device, by id.
    Device(String),
    /// Every device in a group.
    Group(String),
    /// Every device that trusts the key.
    Fleet,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("target {s:?}: expected device:<id>, group:<name> or fleet");
        if s == "fleet" {
            return Ok(Self::Fleet);
        }
        match s.split_once(':') {
            Some(("device", id)) if crate::identity::valid_path_segment(id) => {
                Ok(Self::Device(id.to_owned()))
            }
            Some(("group", g)) if crate::cloud::topics::valid_group(g) => {
                Ok(Self::Group(g.to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(d) => write!(f, "device:{d}"),
            Self::Group(g) => write!(f, "group:{g}"),
            Self::Fleet => f.write_str("fleet"),
        }
    }
}

/// Where a deployment arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via<'a> {
    /// The device's own topic (`ew/v1/d/<id>/in/desired`).
    DeviceTopic,
    /// A group's topic (`ew/v1/g/<group>/desired`).
    GroupTopic(&'a str),
    /// The management API (`edgeward deploy`, the agent).
    Local,
}

/// The device a deployment must be addressed to.
#[derive(Debug, Clone, Copy)]
pub struct Audience<'a> {
    /// Its id.
    pub device_id: &'a str,
    /// The groups it is in (`[cloud] groups`).
    pub groups: &'a [String],
}

/// Checks that `deployment` (from a signed manifest) is addressed to
/// `audience`, arrived `via` a route that carries such a deployment, and
/// has not expired at `now` (seconds since the Unix epoch).
///
/// # Errors
///
/// No target or expiry, a malformed one, another target, or expired;
/// named.
pub fn check(
    deployment: &Deployment,
    audience: Audience<'_>,
    via: Via<'_>,
    now: u64,
) -> Result<Target, String> {
    let target: Target = deployment
        .target
        .as_deref()
        .ok_or("unbound: a signed deployment names its `target` (device:<id>, group:<name> or fleet) in the manifest")?
        .parse()?;
    let expires = deployment
        .expires
        .as_deref()
        .ok_or("unbound: a signed deployment names when it `expires` (RFC 3339 UTC, e.g. 2027-01-31T00:00:00Z) in the manifest")?;
    let at = parse_utc(expires).ok_or_else(|| {
        format!("expires {expires:?}: expected RFC 3339 UTC, e.g. 2027-01-31T00:00:00Z")
    })?;
    let addressed = match (&target, via) {
        (Target::Fleet, _) => true,
        (Target::Device(d), Via::DeviceTopic | Via::Local) => d == audience.device_id,
        (Target::Group(g), Via::GroupTopic(t)) => g == t,
        (Target::Group(g), Via::Local) => audience.groups.contains(g),
        (Target::Device(_), Via::GroupTopic(_)) | (Target::Group(_), Via::DeviceTopic) => false,
    };
    if !addressed {
        let route = match via {
            Via::DeviceTopic => "this device's topic".to_owned(),
            Via::GroupTopic(g) => format!("group {g}'s topic"),
            Via::Local => "the management API".to_owned(),
        };
        return Err(format!(
            "addressed to {target}, not to this device (device:{}{}) on {route}: a deployment signed for another target is refused",
            audience.device_id,
            audience
                .groups
                .iter()
                .map(|g| format!(", group:{g}"))
                .collect::<String>()
        ));
    }
    if now >= at {
        return Err(format!(
            "expired at {expires}: sign it again with a later `expires`"
        ));
    }
    Ok(target)
}

/// Seconds since the Unix epoch of `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn parse_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let rest = &s[19..];
    let rest = match rest.strip_prefix('.') {
        Some(frac) => {
            let digits = frac.len() - 1;
            if !(1..=9).contains(&digits) || !frac[..digits].bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            &frac[digits..]
        }
        None => rest,
    };
    if rest != "Z" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = &s[r];
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || d < 1
        || d > days_in[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || se > 59
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), the inverse of
    // runtime::logfile::rfc3339.
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

/// Seconds since the Unix epoch, now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn deployment(target: Option<&str>, expires: Option<&str>) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "version": "1",
            "target": target,
            "expires": expires,
        }))
        .unwrap()
    }

    #[test]
    fn times_parse_as_the_log_writes_them() {
        for secs in [0u64, 951_782_400, 1_764_374_400, 4_102_444_799] {
            let text = crate::runtime::logfile::rfc3339(std::time::Duration::from_secs(secs));
            assert_eq!(parse_utc(&text), Some(secs), "{text}");
            assert_eq!(parse_utc(&text.replace(".000", "")), Some(secs), "{text}");
        }
        for bad in [
            "",
            "2027-01-31",
            "2027-01-31T00:00:00",
            "2027-01-31T00:00:00+01:00",
            "2027-02-30T00:00:00Z",
            "2027-13-01T00:00:00Z",
            "2027-01-31T24:00:00Z",
            "+027-01-31T00:00:00Z",
            "2027-01-31T00:00:00.Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_what_is_addressed_to_this_device_and_unexpired_passes() {
        let groups = ["line-a".to_owned()];
        let me = Audience {
            device_id: "gw-1",
            groups: &groups,
        };
        let now = 1_800_000_000;
        let later = "2030-01-01T00:00:00Z";
        let ok = |t: &str, via| check(&deployment(Some(t), Some(later)), me, via, now);
        assert_eq!(
            ok("device:gw-1", Via::DeviceTopic).unwrap(),
            Target::Device("gw-1".into())
        );
        assert!(ok("device:gw-1", Via::Local).is_ok());
        assert!(ok("group:line-a", Via::GroupTopic("line-a")).is_ok());
        assert!(ok("group:line-a", Via::Local).is_ok());
        assert!(ok("fleet", Via::GroupTopic("line-a")).is_ok());
        assert!(ok("fleet", Via::DeviceTopic).is_ok());
        // Another device's, another group's, or on the wrong route.
        for (t, via) in [
            ("device:gw-2", Via::DeviceTopic),
            ("device:gw-2", Via::Local),
            ("group:line-b", Via::GroupTopic("line-a")),
            ("group:line-b", Via::Local),
            ("device:gw-1", Via::GroupTopic("line-a")),
            ("group:line-a", Via::DeviceTopic),
        ] {
            let e = ok(t, via).unwrap_err();
            assert!(e.contains("not to this device"), "{t} {via:?}: {e}");
        }
        for t in ["", "device:", "device:../x", "group:A B", "fleet:x", "gw-1"] {
            assert!(
                ok(t, Via::DeviceTopic).unwrap_err().contains("target"),
                "{t:?}"
            );
        }
        let e = check(
            &deployment(Some("fleet"), Some("2020-01-01T00:00:00Z")),
            me,
            Via::DeviceTopic,
            now,
        )
        .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let e = check(&deployment(None, Some(later)), me, Via::DeviceTopic, now).unwrap_err();
        assert!(e.contains("target"), "{e}");
        let e = check(&deployment(Some("fleet"), None), me, Via::DeviceTopic, now).unwrap_err();
        assert!(e.contains("expires"), "{e}");
        let e = check(
            &deployment(Some("fleet"), Some("tomorrow")),
            me,
            Via::DeviceTopic,
            now,
        )
        .unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
    }
}
