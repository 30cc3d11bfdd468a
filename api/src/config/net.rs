//! virtio-net interfaces: `--net` and the `net` list of the JSON config.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    choice, key_values, ConfigError, MAX_NET_DEVICES, MAX_NET_QUEUE_PAIRS, MAX_TAP_NAME_LEN,
};

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The group bit: a multicast (or broadcast) address cannot be a NIC's own.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a MAC address like 52:54:00:12:34:56");
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether the interface's queues run in the kernel (vhost-net) or in chapeau's own threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VhostMode {
    /// vhost-net when /dev/vhost-net exists (or vhost fds are given), else the userspace path.
    #[default]
    Auto,
    /// vhost-net or an error.
    On,
    /// Always the userspace datapath.
    Off,
}

impl VhostMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VhostMode::Auto => "auto",
            VhostMode::On => "on",
            VhostMode::Off => "off",
        }
    }
}

/// A virtio-net interface on a tap, opened by name or inherited as descriptors (how Kata passes
/// them). JSON: `{"tap": "tap0", "mac": "52:54:00:12:34:56", "queues": 2, "vhost": "auto"}` or
/// `{"fds": [4, 5], "mac": "…", "vhost_fds": [3, 6]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The API's name for it (`PUT /network-interfaces/{id}`); `net0`, `net1`, … otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A tap to open (or create) by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Open tap descriptors chapeau inherited, one per queue pair.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fds: Vec<i32>,
    pub mac: MacAddr,
    /// Queue pairs (multiqueue when more than one). With `fds`, their count.
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default)]
    pub vhost: VhostMode,
    /// Inherited /dev/vhost-net descriptors, one per queue pair.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_fds: Vec<i32>,
}

fn default_queues() -> u16 {
    1
}

const NET_FORM: &str = "tap=NAME,mac=MAC[,queues=N][,vhost=auto|on|off] or \
fd=N[:M...],mac=MAC[,vhostfd=K[:L...]]";

fn parse_fds(key: &str, list: &str) -> Result<Vec<i32>, String> {
    list.split(':')
        .map(|fd| {
            fd.parse::<i32>()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or_else(|| format!("{key}={list}: expected descriptor numbers like 4:5"))
        })
        .collect()
}

/// The `--net` syntax (see [`NET_FORM`]); keys in any order.
impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = ConfigError::NetSyntax;
        let [id, tap, fd, mac, queues, vhost, vhostfd] = key_values(
            s,
            ["id", "tap", "fd", "mac", "queues", "vhost", "vhostfd"],
            NET_FORM,
        )
        .map_err(syntax)?;
        let mac = mac
            .ok_or_else(|| syntax(format!("missing mac=MAC (expected {NET_FORM})")))?
            .parse::<MacAddr>()
            .map_err(|e| syntax(format!("mac={e}")))?;
        let fds = fd
            .map(|list| parse_fds("fd", list))
            .transpose()
            .map_err(syntax)?;
        let vhost_fds = vhostfd
            .map(|list| parse_fds("vhostfd", list))
            .transpose()
            .map_err(syntax)?;
        let queues = match (queues, &fds) {
            (Some(n), _) => n
                .parse::<u16>()
                .map_err(|_| syntax(format!("queues={n}: expected a number of queue pairs")))?,
            (None, Some(fds)) => u16::try_from(fds.len()).unwrap_or(u16::MAX),
            (None, None) => 1,
        };
        let modes = [
            ("auto", VhostMode::Auto),
            ("on", VhostMode::On),
            ("off", VhostMode::Off),
        ];
        let vhost = choice("vhost", vhost, &modes, VhostMode::Auto).map_err(syntax)?;
        Ok(NetConfig {
            id: id.map(str::to_string),
            tap: tap.map(str::to_string),
            fds: fds.unwrap_or_default(),
            mac,
            queues,
            vhost,
            vhost_fds: vhost_fds.unwrap_or_default(),
        })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |fds: &[i32]| fds.iter().map(i32::to_string).collect::<Vec<_>>().join(":");
        if let Some(id) = &self.id {
            write!(f, "id={id},")?;
        }
        match &self.tap {
            Some(tap) => write!(f, "tap={tap},")?,
            None => write!(f, "fd={},", join(&self.fds))?,
        }
        write!(
            f,
            "mac={},queues={},vhost={}",
            self.mac,
            self.queues,
            self.vhost.as_str()
        )?;
        if !self.vhost_fds.is_empty() {
            write!(f, ",vhostfd={}", join(&self.vhost_fds))?;
        }
        Ok(())
    }
}

impl NetConfig {
    /// Checks one interface; the reason names the value that is wrong.
    fn check(&self) -> Result<(), (String, String)> {
        let shown = self.to_string();
        let fail = |reason: String| Err((shown.clone(), reason));
        match (&self.tap, self.fds.is_empty()) {
            (Some(_), false) => return fail("give a tap name or descriptors, not both".into()),
            (None, true) => return fail("needs a tap name (tap=) or descriptors (fd=)".into()),
            _ => {}
        }
        if let Some(tap) = &self.tap {
            if tap.is_empty() {
                return fail("the tap name is empty".into());
            }
            if tap.len() > MAX_TAP_NAME_LEN {
                return fail(format!(
                    "a tap name is at most {MAX_TAP_NAME_LEN} bytes (IFNAMSIZ), this one has {}",
                    tap.len()
                ));
            }
            if let Some(c) = tap
                .chars()
                .find(|&c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
            {
                return fail(format!("a tap name cannot contain {c:?}"));
            }
        }
        if self.mac.is_multicast() {
            return fail(format!(
                "{} is a multicast address; a NIC needs a unicast one (first byte even)",
                self.mac
            ));
        }
        if self.mac.0 == [0; 6] {
            return fail("00:00:00:00:00:00 is not a usable MAC address".into());
        }
        if self.queues == 0 || self.queues > MAX_NET_QUEUE_PAIRS {
            return fail(format!(
                "queues={}: from 1 to {MAX_NET_QUEUE_PAIRS} queue pairs are supported",
                self.queues
            ));
        }
        let pairs = usize::from(self.queues);
        if !self.fds.is_empty() && self.fds.len() != pairs {
            return fail(format!(
                "{} tap descriptors for {pairs} queue pairs: give one per pair",
                self.fds.len()
            ));
        }
        if !self.vhost_fds.is_empty() {
            if self.vhost == VhostMode::Off {
                return fail("vhost descriptors given with vhost=off".into());
            }
            if self.vhost_fds.len() != pairs {
                return fail(format!(
                    "{} vhost descriptors for {pairs} queue pairs: give one per pair",
                    self.vhost_fds.len()
                ));
            }
        }
        let all: Vec<i32> = self.fds.iter().chain(&self.vhost_fds).copied().collect();
        if let Some(fd) = all.iter().find(|fd| **fd <= 2) {
            return fail(format!(
                "descriptor {fd} is stdin, stdout or stderr, not an inherited tap or vhost fd"
            ));
        }
        if let Some((i, fd)) = all
            .iter()
            .enumerate()
            .find(|(i, fd)| all[..*i].contains(fd))
        {
            let _ = i;
            return fail(format!("descriptor {fd} is given twice"));
        }
        Ok(())
    }
}

/// Validates the VM's interfaces, each on its own and against each other. `Err` holds the
/// value shown and the reason.
pub(crate) fn validate_nets(nets: &[NetConfig]) -> Result<(), (String, String)> {
    if nets.len() > MAX_NET_DEVICES {
        return Err((
            String::new(),
            format!(
                "{} network interfaces given, at most {MAX_NET_DEVICES} are supported",
                nets.len()
            ),
        ));
    }
    for (i, net) in nets.iter().enumerate() {
        net.check()?;
        let earlier = &nets[..i];
        if earlier.iter().any(|n| n.mac == net.mac) {
            return Err((
                format!("mac={}", net.mac),
                "two interfaces have this MAC address".into(),
            ));
        }
        if let Some(tap) = &net.tap {
            if earlier.iter().any(|n| n.tap.as_ref() == Some(tap)) {
                return Err((format!("tap={tap}"), "two interfaces use this tap".into()));
            }
        }
        if net.id.is_some() && earlier.iter().any(|n| n.id == net.id) {
            return Err((
                format!("id={}", net.id.as_deref().unwrap_or_default()),
                "two interfaces have this id".into(),
            ));
        }
        let mine: Vec<i32> = net.fds.iter().chain(&net.vhost_fds).copied().collect();
        if let Some(fd) = earlier
            .iter()
            .flat_map(|n| n.fds.iter().chain(&n.vhost_fds))
            .find(|fd| mine.contains(fd))
        {
            return Err((
                format!("fd {fd}"),
                "two interfaces use this descriptor".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> NetConfig {
        s.parse().unwrap()
    }

    fn check(nets: &[&str]) -> Result<(), String> {
        let nets: Vec<NetConfig> = nets.iter().map(|s| net(s)).collect();
        validate_nets(&nets).map_err(|(v, r)| format!("{v}: {r}"))
    }

    #[test]
    fn mac_forms() {
        let mac: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
            "",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr([1, 0, 0, 0, 0, 0]).is_multicast());
        assert!(!MacAddr([2, 0, 0, 0, 0, 0]).is_multicast());
    }

    #[test]
    fn flag_forms() {
        let n = net("tap=tap0,mac=52:54:00:12:34:56,queues=2,vhost=off");
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert_eq!(n.queues, 2);
        assert_eq!(n.vhost, VhostMode::Off);
        assert_eq!(n.to_string().parse::<NetConfig>().unwrap(), n);
        let n = net("fd=4:5,mac=52:54:00:12:34:56,vhostfd=6:7");
        assert_eq!(n.fds, vec![4, 5]);
        assert_eq!(n.vhost_fds, vec![6, 7]);
        assert_eq!(n.queues, 2, "one pair per descriptor");
        assert_eq!(n.vhost, VhostMode::Auto);
        assert_eq!(n.to_string().parse::<NetConfig>().unwrap(), n);
        let err = |s: &str| s.parse::<NetConfig>().unwrap_err().to_string();
        assert!(err("tap=t").contains("missing mac=MAC"));
        assert!(err("tap=t,mac=01:02").contains("is not a MAC address"));
        assert!(err("tap=t,mac=52:54:00:12:34:56,vhost=yes").contains("vhost=yes"));
        assert!(err("fd=a,mac=52:54:00:12:34:56").contains("descriptor numbers"));
        assert!(err("tap=t,mac=52:54:00:12:34:56,queues=x").contains("queues=x"));
        assert!(err("tap=t,mac=52:54:00:12:34:56,speed=1").contains("unknown key"));
    }

    #[test]
    fn validation() {
        check(&[
            "tap=tap0,mac=52:54:00:00:00:01",
            "tap=tap1,mac=52:54:00:00:00:02",
        ])
        .unwrap();
        let cases = [
            (
                vec!["tap=tap0,mac=01:00:5e:00:00:01"],
                "is a multicast address",
            ),
            (vec!["tap=tap0,mac=00:00:00:00:00:00"], "not a usable MAC"),
            (
                vec!["tap=tap0,mac=52:54:00:00:00:01,queues=17"],
                "from 1 to 16 queue pairs",
            ),
            (
                vec!["tap=tap0,mac=52:54:00:00:00:01,queues=0"],
                "from 1 to 16 queue pairs",
            ),
            (
                vec!["tap=abcdefghijklmnop,mac=52:54:00:00:00:01"],
                "at most 15 bytes (IFNAMSIZ)",
            ),
            (vec!["tap=a/b,mac=52:54:00:00:00:01"], "cannot contain '/'"),
            (vec!["mac=52:54:00:00:00:01"], "needs a tap name"),
            (vec!["tap=t,fd=4,mac=52:54:00:00:00:01"], "not both"),
            (
                vec!["fd=4:5,mac=52:54:00:00:00:01,queues=1"],
                "give one per pair",
            ),
            (
                vec!["fd=4,mac=52:54:00:00:00:01,vhostfd=5:6"],
                "2 vhost descriptors for 1",
            ),
            (
                vec!["fd=4,mac=52:54:00:00:00:01,vhostfd=5,vhost=off"],
                "with vhost=off",
            ),
            (
                vec!["fd=1,mac=52:54:00:00:00:01"],
                "stdin, stdout or stderr",
            ),
            (vec!["fd=4,mac=52:54:00:00:00:01,vhostfd=4"], "given twice"),
            (
                vec!["tap=a,mac=52:54:00:00:00:01", "tap=b,mac=52:54:00:00:00:01"],
                "two interfaces have this MAC",
            ),
            (
                vec!["tap=a,mac=52:54:00:00:00:01", "tap=a,mac=52:54:00:00:00:02"],
                "two interfaces use this tap",
            ),
            (
                vec![
                    "fd=4,mac=52:54:00:00:00:01",
                    "fd=5,mac=52:54:00:00:00:02,vhostfd=4",
                ],
                "two interfaces use this descriptor",
            ),
        ];
        for (nets, reason) in cases {
            let msg = check(&nets).unwrap_err();
            assert!(msg.contains(reason), "{nets:?}: {msg}");
        }
        let many: Vec<String> = (0..=MAX_NET_DEVICES)
            .map(|i| format!("tap=t{i},mac=52:54:00:00:00:{i:02x}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check(&many)
            .unwrap_err()
            .contains("at most 8 are supported"));
    }

    #[test]
    fn json_form() {
        let n: NetConfig = serde_json::from_str(
            r#"{"fds":[4,5],"mac":"52:54:00:12:34:56","queues":2,"vhost":"on","vhost_fds":[6,7]}"#,
        )
        .unwrap();
        assert_eq!(n.fds, vec![4, 5]);
        assert_eq!(n.vhost, VhostMode::On);
        let back = serde_json::to_value(&n).unwrap();
        assert_eq!(back["mac"], "52:54:00:12:34:56");
        assert!(back.get("tap").is_none());
        let err = serde_json::from_str::<NetConfig>(
            r#"{"tap":"t","mac":"52:54:00:12:34:56","mtu":9000}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `mtu`"), "{err}");
        let err = serde_json::from_str::<NetConfig>(r#"{"tap":"t","mac":"nope"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a MAC address"), "{err}");
    }
}
