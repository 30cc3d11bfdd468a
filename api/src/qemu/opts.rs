//! QEMU's `key=value,key=value` option syntax (QemuOpts), as Kata writes it: `,,` is a literal
//! comma, a bare `key` means `key=on` and `nokey` means `key=off` (the older spelling of
//! `server,nowait`), the first item may be the value of an implied key (`-device virtio-rng`),
//! and empty items (`-cpu host,`) are ignored.

/// One option's argument split into keys and values. Callers `take` what they understand;
/// anything left is an error naming the key.
#[derive(Debug)]
pub(crate) struct Opts {
    items: Vec<(String, String)>,
}

/// Splits on commas that are not doubled.
fn split_items(arg: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            items.push(std::mem::take(&mut current));
        }
    }
    items.push(current);
    items
}

impl Opts {
    /// `implied` names the key a first item without `=` is the value of.
    pub(crate) fn parse(arg: &str, implied: Option<&str>) -> Opts {
        let mut items = Vec::new();
        for (index, item) in split_items(arg).into_iter().enumerate() {
            if item.is_empty() {
                continue;
            }
            let pair = match (item.split_once('='), implied) {
                (Some((key, value)), _) => (key.to_string(), value.to_string()),
                (None, Some(key)) if index == 0 => (key.to_string(), item),
                (None, _) => match item.strip_prefix("no").filter(|rest| !rest.is_empty()) {
                    Some(flag) => (flag.to_string(), "off".to_string()),
                    None => (item, "on".to_string()),
                },
            };
            items.push(pair);
        }
        Opts { items }
    }

    /// The value of `key` (the last one when repeated, as QEMU takes it), removed.
    pub(crate) fn take(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        self.items.retain(|(k, v)| {
            if k == key {
                found = Some(v.clone());
                false
            } else {
                true
            }
        });
        found
    }

    /// The value of the first of `keys` present (QEMU accepts `_` and `-` spellings of some).
    pub(crate) fn take_either(&mut self, keys: &[&str]) -> Option<String> {
        keys.iter()
            .fold(None, |found, key| self.take(key).or(found))
    }

    /// A boolean: `on`/`off` and the older `yes`/`no`/`true`/`false`.
    pub(crate) fn take_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        self.take(key)
            .map(|value| parse_bool(key, &value))
            .transpose()
    }

    /// A non-negative integer.
    pub(crate) fn take_number<T: std::str::FromStr>(
        &mut self,
        key: &str,
    ) -> Result<Option<T>, String> {
        self.take(key)
            .map(|value| {
                value
                    .parse::<T>()
                    .map_err(|_| format!("Parameter '{key}' expects a number"))
            })
            .transpose()
    }

    /// Takes and ignores keys that change nothing for chapeau.
    pub(crate) fn ignore(&mut self, keys: &[&str]) {
        self.items.retain(|(k, _)| !keys.contains(&k.as_str()));
    }

    /// The first key nobody took.
    pub(crate) fn leftover(&self) -> Option<&str> {
        self.items.first().map(|(k, _)| k.as_str())
    }
}

pub(crate) fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(arg: &str, implied: Option<&str>) -> Vec<(String, String)> {
        Opts::parse(arg, implied).items
    }

    #[test]
    fn splits_like_qemu_opts() {
        let p = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            pairs("pc,accel=kvm,kernel_irqchip,nvdimm", Some("type")),
            vec![
                p("type", "pc"),
                p("accel", "kvm"),
                p("kernel_irqchip", "on"),
                p("nvdimm", "on")
            ]
        );
        assert_eq!(
            pairs("socket,server,nowait", Some("backend")),
            vec![p("backend", "socket"), p("server", "on"), p("wait", "off")]
        );
        assert_eq!(
            pairs("file,path=/a,,b,,,x=", Some("t")),
            vec![p("t", "file"), p("path", "/a,b,"), p("x", "")]
        );
        assert_eq!(pairs("host,", Some("model")), vec![p("model", "host")]);
        assert_eq!(
            pairs("driver=x,no", None),
            vec![p("driver", "x"), p("no", "on")]
        );
        assert_eq!(pairs("", Some("t")), vec![]);
    }

    #[test]
    fn take_last_and_bools() {
        let mut opts = Opts::parse("a=1,a=2,b=yes,c=maybe", None);
        assert_eq!(opts.take("a").as_deref(), Some("2"));
        assert_eq!(opts.take_bool("b"), Ok(Some(true)));
        assert_eq!(
            opts.take_bool("c"),
            Err("Parameter 'c' expects 'on' or 'off'".into())
        );
        assert_eq!(opts.leftover(), None);
    }
}
