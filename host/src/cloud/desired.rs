//! Desired deployments from the broker: a signed manifest (the same
//! `{manifest, signature}` body `edgeward deploy` sends), held to the
//! device's deployment keys whatever `[signatures]` says, and ordered by
//! its `version`, a decimal counter shared by the device's own topic and its
//! groups' topics. Validity is by version, never by clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::{Deployment, SignedManifest};
use crate::attest::binding::{self, Audience, Via};
use crate::attest::publisher::{PublicKey, verify_manifest};
use crate::measure::Digest;

/// The largest desired deployment accepted (the broker is told the same).
pub const MAX_DESIRED: usize = 1 << 20;

/// Where a desired deployment came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Source {
    /// `ew/v1/d/<device>/in/desired`.
    Device,
    /// `ew/v1/g/<group>/desired`.
    Group(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Device => f.write_str("device"),
            Self::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// The last deployment applied from the broker (kept in the registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Its version.
    pub version: u64,
    /// The digest of its manifest text.
    pub manifest: String,
    /// Its topic.
    pub source: Source,
    /// Who signed it (hex of the key).
    pub signed_by: String,
    /// The digest of what it deploys, whoever it was addressed to
    /// ([`content_digest`]): a canary's own deployment and its group's,
    /// of one version, deploy the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// The digest of what `d` deploys: its canonical JSON without the
/// binding (target, expiry) and the signer.
pub fn content_digest(d: &Deployment) -> Option<String> {
    let mut v = serde_json::to_value(d).ok()?;
    let o = v.as_object_mut()?;
    for k in ["target", "expires", "signed_by"] {
        o.remove(k);
    }
    crate::attest::jcs::canonical(&v)
        .ok()
        .map(|c| Digest::of(c.as_bytes()).to_string())
}

/// A desired deployment that may be applied.
#[derive(Debug)]
pub struct Accepted {
    /// As the management service takes it (`signed_by` set).
    pub deployment: Deployment,
    /// Its version.
    pub version: u64,
    /// The digest of its manifest text.
    pub manifest: Digest,
    /// See [`Applied::content`].
    pub content: Option<String>,
    /// Where each pinned component can be fetched: digest -> source.
    pub sources: BTreeMap<Digest, String>,
}

/// What to do with a desired deployment.
#[derive(Debug)]
pub enum Verdict {
    /// Newer, and signed by a trusted key: apply it.
    Apply(Box<Accepted>),
    /// The one already applied (a retained message delivered again).
    Current,
    /// Signed, but not newer than the one applied: a replay, or (retained)
    /// history such as a group's deployment the device's own superseded.
    Older {
        /// Its version.
        version: String,
        /// Says which is applied.
        reason: String,
    },
    /// Never applied; the reason names what was wrong.
    Refused {
        /// Its version, when it could be read.
        version: Option<String>,
        /// What was wrong.
        reason: String,
    },
}

fn refused(version: Option<&str>, reason: impl Into<String>) -> Verdict {
    Verdict::Refused {
        version: version.map(str::to_owned),
        reason: reason.into(),
    }
}

/// What a desired deployment is checked against besides its signature.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The device's deployment keys.
    pub keys: &'a [PublicKey],
    /// This device (its id and groups).
    pub audience: Audience<'a>,
    /// The topic it arrived on.
    pub source: &'a Source,
    /// The last deployment applied from the broker.
    pub applied: Option<&'a Applied>,
    /// How far a version may jump past the applied one.
    pub max_step: u64,
    /// Seconds since the Unix epoch.
    pub now: u64,
}

/// Checks `payload` in its [`Context`]: signed by a deployment key, bound
/// to this device (or a group of it, or the fleet) on the topic it came
/// on, unexpired, and newer than the applied version by at most the step.
pub fn check(payload: &[u8], cx: &Context<'_>) -> Verdict {
    let Context { keys, applied, .. } = *cx;
    if payload.len() > MAX_DESIRED {
        return refused(
            None,
            format!(
                "{} bytes, more than the {MAX_DESIRED} a desired deployment may be",
                payload.len()
            ),
        );
    }
    let body: SignedManifest = match serde_json::from_slice(payload) {
        Ok(b) => b,
        Err(e) => {
            return refused(
                None,
                format!("not a signed manifest ({{\"manifest\", \"signature\"}}): {e}"),
            );
        }
    };
    let mut deployment = match body.deployment() {
        Ok(d) => d,
        Err(e) => return refused(None, e),
    };
    let text = deployment.version.clone();
    let v = Some(text.as_str());
    let Some(version) = parse_version(&text) else {
        return refused(
            v,
            format!(
                "version {text:?}: a cloud deployment's version is a decimal counter (1 to 18446744073709551615)"
            ),
        );
    };
    let sig = match body.signature.as_deref().map(|b| {
        use base64ct::Encoding as _;
        base64ct::Base64::decode_vec(b.trim())
    }) {
        None => {
            return refused(
                v,
                "unsigned: a cloud deployment must be signed by a deployment key",
            );
        }
        Some(Err(_)) => return refused(v, "signature: not base64"),
        Some(Ok(s)) => s,
    };
    let signer = match verify_manifest(body.manifest.as_bytes(), Some(&sig), keys) {
        Ok(k) => k,
        Err(e) => return refused(v, format!("signature: {e}")),
    };
    let via = match cx.source {
        Source::Device => Via::DeviceTopic,
        Source::Group(g) => Via::GroupTopic(g),
    };
    if let Err(e) = binding::check(&deployment, cx.audience, via, cx.now) {
        return refused(v, e);
    }
    let manifest = Digest::of(body.manifest.as_bytes());
    let content = content_digest(&deployment);
    if let Some(a) = applied {
        // The applied one again, or the same version deploying the same
        // (a canary's own deployment, then its group's).
        if version == a.version
            && (manifest.to_string() == a.manifest || (content.is_some() && content == a.content))
        {
            return Verdict::Current;
        }
        if version <= a.version {
            return Verdict::Older {
                version: text.clone(),
                reason: format!(
                    "version {version} is not newer than the applied version {} (an older or replayed deployment)",
                    a.version
                ),
            };
        }
    }
    let base = applied.map_or(0, |a| a.version);
    if applied.is_some() && version - base > cx.max_step {
        return refused(
            v,
            format!(
                "version {version} jumps {} past the applied version {base}, more than [cloud] max_version_step ({}): a version that large would hold back every later deployment",
                version - base,
                cx.max_step
            ),
        );
    }
    let sources = match body.sources() {
        Ok(s) => s,
        Err(e) => return refused(v, e),
    };
    deployment.signed_by = Some(signer);
    Verdict::Apply(Box::new(Accepted {
        deployment,
        version,
        manifest,
        content,
        sources,
    }))
}

/// `1` to `u64::MAX` in plain decimal: no sign, no leading zero. What a
/// device takes as a cloud deployment's version (and `edgeward fleet`
/// checks before publishing).
pub fn parse_version(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0')
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key() -> (ed25519_compact::KeyPair, PublicKey) {
        let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([7; 32]));
        let mut raw = vec![1];
        raw.extend_from_slice(kp.pk.as_ref());
        let pk = PublicKey::from_bytes(&raw).unwrap();
        (kp, pk)
    }

    fn signed(kp: &ed25519_compact::KeyPair, manifest: &str) -> Vec<u8> {
        use base64ct::Encoding as _;
        let mut m = binding::DEPLOYMENT_DOMAIN.to_vec();
        m.extend_from_slice(Digest::of(manifest.as_bytes()).as_bytes());
        let sig = kp.sk.sign(m, None);
        serde_json::to_vec(&serde_json::json!({
            "manifest": manifest,
            "signature": base64ct::Base64::encode_string(sig.as_ref()),
        }))
        .unwrap()
    }

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    fn manifest(version: &str) -> String {
        bound(version, "device:gw-1")
    }

    fn bound(version: &str, target: &str) -> String {
        format!(
            "version = \"{version}\"\ntarget = \"{target}\"\nexpires = \"2030-01-01T00:00:00Z\"\n[[module]]\nname = \"a\"\ndigest = \"{D}\"\nsource = \"oci://127.0.0.1:5000/a:1\"\n"
        )
    }

    const GROUPS: &[String] = &[];

    fn cx<'a>(keys: &'a [PublicKey], applied: Option<&'a Applied>) -> Context<'a> {
        Context {
            keys,
            audience: Audience {
                device_id: "gw-1",
                groups: GROUPS,
            },
            source: &Source::Device,
            applied,
            max_step: 1000,
            now: 1_800_000_000,
        }
    }

    fn check(payload: &[u8], keys: &[PublicKey], applied: Option<&Applied>) -> Verdict {
        super::check(payload, &cx(keys, applied))
    }

    #[test]
    fn deployments_are_bound_to_their_target_expiry_and_step() {
        let (kp, pk) = key();
        let keys = [pk];
        let reason = |v: Verdict| match v {
            Verdict::Refused { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Another device's, signed by the same key.
        let theirs = bound("3", "device:gw-2");
        assert!(reason(check(&signed(&kp, &theirs), &keys, None)).contains("not to this device"));
        // A group's, replayed on the device's topic.
        let group = bound("3", "group:line-a");
        assert!(reason(check(&signed(&kp, &group), &keys, None)).contains("not to this device"));
        // Expired.
        let old = manifest("3").replace("2030-01-01", "2020-01-01");
        assert!(reason(check(&signed(&kp, &old), &keys, None)).contains("expired"));
        // Unbound (signed before targets existed, or by hand).
        let unbound = manifest("3").replace("target = \"device:gw-1\"\n", "");
        assert!(reason(check(&signed(&kp, &unbound), &keys, None)).contains("target"));
        // A signature over the bare digest (no domain tag) is no deployment
        // signature.
        use base64ct::Encoding as _;
        let m = manifest("3");
        let bare = kp.sk.sign(Digest::of(m.as_bytes()).as_bytes(), None);
        let bare = serde_json::to_vec(&serde_json::json!({
            "manifest": m, "signature": base64ct::Base64::encode_string(bare.as_ref()),
        }))
        .unwrap();
        assert!(reason(check(&bare, &keys, None)).contains("signature"));
        // A huge version past the applied one.
        let applied = Applied {
            version: 3,
            manifest: String::new(),
            source: Source::Device,
            signed_by: String::new(),
            content: None,
        };
        // The same version deploying the same, addressed elsewhere (a
        // canary's own deployment, then its group's on the group topic).
        let Verdict::Apply(a) = check(&signed(&kp, &manifest("3")), &keys, None) else {
            panic!("a signed deployment applies");
        };
        let canary = Applied {
            version: 3,
            manifest: a.manifest.to_string(),
            source: Source::Device,
            signed_by: String::new(),
            content: a.content.clone(),
        };
        let group = Context {
            source: &Source::Group("line-a".into()),
            audience: Audience {
                device_id: "gw-1",
                groups: &["line-a".to_owned()],
            },
            ..cx(&keys, Some(&canary))
        };
        let same = signed(&kp, &bound("3", "group:line-a"));
        assert!(matches!(super::check(&same, &group), Verdict::Current));
        let other = signed(
            &kp,
            &bound("3", "group:line-a").replace("name = \"a\"", "name = \"b\""),
        );
        assert!(matches!(
            super::check(&other, &group),
            Verdict::Older { .. }
        ));
        let huge = manifest("18446744073709551615");
        assert!(
            reason(check(&signed(&kp, &huge), &keys, Some(&applied))).contains("max_version_step")
        );
        assert!(matches!(
            check(&signed(&kp, &manifest("1003")), &keys, Some(&applied)),
            Verdict::Apply(_)
        ));
        assert!(
            reason(check(
                &signed(&kp, &manifest("1004")),
                &keys,
                Some(&applied)
            ))
            .contains("max_version_step")
        );
    }

    #[test]
    fn newer_signed_deployments_apply_others_are_named() {
        let (kp, pk) = key();
        let keys = [pk];
        let Verdict::Apply(a) = check(&signed(&kp, &manifest("3")), &keys, None) else {
            panic!("a signed deployment applies");
        };
        assert_eq!(a.version, 3);
        assert_eq!(
            a.sources.get(&D.parse().unwrap()).map(String::as_str),
            Some("oci://127.0.0.1:5000/a:1")
        );
        assert!(a.deployment.signed_by.is_some());
        let applied = Applied {
            version: 3,
            manifest: a.manifest.to_string(),
            source: Source::Device,
            signed_by: String::new(),
            content: None,
        };
        assert!(matches!(
            check(&signed(&kp, &manifest("3")), &keys, Some(&applied)),
            Verdict::Current
        ));
        let reason = |v: Verdict| match v {
            Verdict::Refused { reason, .. } | Verdict::Older { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // The same version with other contents, and an older one.
        let other = manifest("3").replace("a:1", "a:2");
        assert!(reason(check(&signed(&kp, &other), &keys, Some(&applied))).contains("not newer"));
        assert!(
            reason(check(&signed(&kp, &manifest("2")), &keys, Some(&applied)))
                .contains("not newer")
        );
        // Unsigned, signed by another key, tampered after signing.
        let unsigned = serde_json::to_vec(&serde_json::json!({"manifest": manifest("4")})).unwrap();
        assert!(reason(check(&unsigned, &keys, Some(&applied))).contains("unsigned"));
        let stranger = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([8; 32]));
        assert!(
            reason(check(&signed(&stranger, &manifest("4")), &keys, None)).contains("signature")
        );
        let mut tampered: serde_json::Value =
            serde_json::from_slice(&signed(&kp, &manifest("4"))).unwrap();
        tampered["manifest"] = manifest("5").into();
        let tampered = serde_json::to_vec(&tampered).unwrap();
        assert!(reason(check(&tampered, &keys, None)).contains("signature"));
        // Versions that are not counters.
        for v in ["", "0", "01", "+4", "4.0", "v4", "99999999999999999999"] {
            assert!(
                reason(check(&signed(&kp, &manifest(v)), &keys, None)).contains("version"),
                "{v:?}"
            );
        }
        // Not JSON, too big.
        assert!(reason(check(b"\xff", &keys, None)).contains("not a signed manifest"));
        assert!(reason(check(&vec![b' '; MAX_DESIRED + 1], &keys, None)).contains("bytes"));
    }
}
