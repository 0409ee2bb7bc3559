//! The topic tree: `ew/v1/d/<device>/in|out/...` for each device and
//! `ew/v1/g/<group>/desired` for each group. Device ids and group names
//! hold none of MQTT's separators or wildcards (`/ + #`), so a broker ACL
//! keyed on the certificate's CN (`%u`) confines a device to its own tree.

use super::desired::Source;

/// Group names: as module names.
pub fn valid_group(g: &str) -> bool {
    crate::spec::valid_module_name(g)
}

/// One device's topics.
#[derive(Debug, Clone)]
pub struct Topics {
    device: String,
    groups: Vec<String>,
}

impl Topics {
    /// For `device` in `groups`.
    pub fn new(device: &str, groups: &[String]) -> Self {
        Self {
            device: device.to_owned(),
            groups: groups.to_vec(),
        }
    }

    /// The device's id.
    pub fn device(&self) -> &str {
        &self.device
    }

    fn d(&self, rest: &str) -> String {
        format!("ew/v1/d/{}/{rest}", self.device)
    }

    /// The device's desired deployment (retained).
    pub fn desired(&self) -> String {
        self.d("in/desired")
    }

    /// Attestation challenges.
    pub fn challenge(&self) -> String {
        self.d("in/attest/challenge")
    }

    /// What the device runs (retained).
    pub fn reported(&self) -> String {
        self.d("out/reported")
    }

    /// Attestation evidence, answering challenges.
    pub fn evidence(&self) -> String {
        self.d("out/attest/evidence")
    }

    /// Events.
    pub fn events(&self) -> String {
        self.d("out/events")
    }

    /// Online / offline (retained; the offline one is the will).
    pub fn state(&self) -> String {
        self.d("out/state")
    }

    /// A group's desired deployment.
    pub fn group_desired(group: &str) -> String {
        format!("ew/v1/g/{group}/desired")
    }

    /// What the device subscribes to.
    pub fn subscriptions(&self) -> Vec<String> {
        // Its own events come back: the outbox's proof of delivery.
        let mut v = vec![self.desired(), self.challenge(), self.events()];
        v.extend(self.groups.iter().map(|g| Self::group_desired(g)));
        v
    }

    /// Where a desired deployment on `topic` comes from (`None`: not one
    /// of ours).
    pub fn source_of(&self, topic: &str) -> Option<Source> {
        if topic == self.desired() {
            return Some(Source::Device);
        }
        self.groups
            .iter()
            .find(|g| topic == Self::group_desired(g))
            .map(|g| Source::Group(g.clone()))
    }
}
