//! Host lists in mlframework's form: `-a/--hosts [user@]host[:port],...`, numbered from 1 in
//! the order given (`-m 1`, `-w 2,3` refer to these numbers).
//!
//! A host is an IPv4 address, a name, or an IPv6 address (bare, or in brackets when it has a
//! port: `[::1]:2222`). Entries are validated here, once, so that nothing later can hand ssh a
//! destination or user that it would read as an option (`-oProxyCommand=...`).

use std::fmt;
use std::net::Ipv6Addr;

/// One entry of a host list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Host {
    /// The login name; ssh's default (the config file, then the local user) when absent.
    pub user: Option<String>,
    /// An IPv4 address, a host name, or an IPv6 address without brackets.
    pub addr: String,
    /// The SSH port; ssh's default (the config file, then 22) when absent.
    pub port: Option<u16>,
    /// The host's number in the list, from 1.
    pub index: usize,
}

impl Host {
    /// Whether `addr` is an IPv6 address (it is written in brackets when a port follows).
    pub fn is_ipv6(&self) -> bool {
        self.addr.contains(':')
    }

    /// `[user@]addr`, without the port: what output lines are prefixed with.
    pub fn login(&self) -> String {
        match &self.user {
            Some(user) => format!("{user}@{}", self.addr),
            None => self.addr.clone(),
        }
    }

    /// `N [user@]addr`: the short label of output lines (`[1 gridq-h1@127.0.0.2] ...`).
    pub fn label(&self) -> String {
        format!("{} {}", self.index, self.login())
    }
}

/// `[user@]addr[:port]`, as it would be written in `--hosts` (it parses back to the same host).
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.is_ipv6() {
            write!(f, "[{}]", self.addr)?;
        } else {
            f.write_str(&self.addr)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// A bad `--hosts` list; the message names the entry and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostsError {
    /// Nothing at all.
    #[error("--hosts: the list is empty")]
    Empty,
    /// One entry is malformed.
    #[error("--hosts: entry {index} `{entry}`: {reason}")]
    Entry {
        /// The entry's number, from 1.
        index: usize,
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses a comma-separated host list, numbering the hosts from 1.
///
/// # Errors
/// [`HostsError`] naming the first bad entry: an empty entry, more than one `@`, an empty or
/// odd user name, a bad port, an unbracketed IPv6 address with a port, a name that is not a
/// host name, or an entry repeated (same user, address and port).
pub fn parse_hosts(list: &str) -> Result<Vec<Host>, HostsError> {
    if list.trim().is_empty() {
        return Err(HostsError::Empty);
    }
    let mut hosts: Vec<Host> = Vec::new();
    for (i, raw) in list.split(',').enumerate() {
        let index = i + 1;
        let entry = raw.trim();
        let fail = |reason: String| HostsError::Entry {
            index,
            entry: entry.to_owned(),
            reason,
        };
        let host = parse_entry(entry, index).map_err(fail)?;
        if let Some(first) = hosts
            .iter()
            .find(|h| h.user == host.user && h.addr == host.addr && h.port == host.port)
        {
            return Err(fail(format!("repeats entry {}", first.index)));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

fn parse_entry(entry: &str, index: usize) -> Result<Host, String> {
    if entry.is_empty() {
        return Err("empty entry (two commas in a row, or a comma at an end?)".into());
    }
    let (user, rest) = match entry.split_once('@') {
        Some((_, rest)) if rest.contains('@') => return Err("more than one `@`".into()),
        Some((user, rest)) => (Some(check_user(user)?), rest),
        None => (None, entry),
    };
    let (addr, port) = split_port(rest)?;
    Ok(Host {
        user,
        addr,
        port,
        index,
    })
}

fn check_user(user: &str) -> Result<String, String> {
    if user.is_empty() {
        return Err("empty user name before `@`".into());
    }
    if user.starts_with('-') {
        return Err("a user name must not start with `-`".into());
    }
    if let Some(c) = user
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "user name `{user}` has {c:?}; allowed are letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(user.to_owned())
}

/// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare `v6`.
fn split_port(rest: &str) -> Result<(String, Option<u16>), String> {
    if let Some(inner) = rest.strip_prefix('[') {
        let (v6, after) = inner.split_once(']').ok_or("`[` without a closing `]`")?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| format!("`{v6}` in brackets is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(after.strip_prefix(':').ok_or_else(|| {
                format!("unexpected `{after}` after `]` (expected `:PORT`)")
            })?)?),
        };
        return Ok((v6.to_owned(), port));
    }
    match rest.matches(':').count() {
        0 => Ok((check_name(rest)?, None)),
        1 => {
            let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
            Ok((check_name(name)?, Some(parse_port(port)?)))
        }
        _ => match rest.parse::<Ipv6Addr>() {
            Ok(_) => Ok((rest.to_owned(), None)),
            Err(_) => Err(format!(
                "`{rest}` is not an IPv6 address; with a port, write it as `[ADDRESS]:PORT`"
            )),
        },
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port `{port}` (expected 1-65535)")),
    }
}

/// A host name or IPv4 address: letters, digits, `-`, `.` and `_`, not starting with `-`.
fn check_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("no host name".into());
    }
    if name.starts_with('-') {
        return Err("a host name must not start with `-`".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("host name `{name}` has {c:?}"));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(user: Option<&str>, addr: &str, port: Option<u16>, index: usize) -> Host {
        Host {
            user: user.map(str::to_owned),
            addr: addr.to_owned(),
            port,
            index,
        }
    }

    #[test]
    fn parses_every_form_numbered_from_one() {
        let hosts = parse_hosts(
            "gridq-h1@127.0.0.2:2222, node7,alice@gpu.example.org,[::1]:2200,fe80::1,bob@[2001:db8::2]",
        )
        .unwrap();
        assert_eq!(
            hosts,
            vec![
                host(Some("gridq-h1"), "127.0.0.2", Some(2222), 1),
                host(None, "node7", None, 2),
                host(Some("alice"), "gpu.example.org", None, 3),
                host(None, "::1", Some(2200), 4),
                host(None, "fe80::1", None, 5),
                host(Some("bob"), "2001:db8::2", None, 6),
            ]
        );
    }

    #[test]
    fn display_round_trips() {
        for entry in [
            "gridq-h1@127.0.0.2:2222",
            "node7",
            "[::1]:2200",
            "[fe80::1]",
            "bob@[2001:db8::2]:22",
        ] {
            let hosts = parse_hosts(entry).unwrap();
            let shown = hosts[0].to_string();
            assert_eq!(
                parse_hosts(&shown).unwrap(),
                hosts,
                "{entry} shown as {shown}"
            );
        }
        let h = &parse_hosts("a,gridq-h1@127.0.0.2:2222").unwrap()[1];
        assert_eq!(h.to_string(), "gridq-h1@127.0.0.2:2222");
        assert_eq!(h.label(), "2 gridq-h1@127.0.0.2");
    }

    #[test]
    fn bad_entries_are_named_with_the_reason() {
        let cases = [
            ("h1,a@@b", "--hosts: entry 2 `a@@b`: more than one `@`"),
            (
                "h1,,h2",
                "--hosts: entry 2 ``: empty entry (two commas in a row, or a comma at an end?)",
            ),
            (
                "h1,",
                "--hosts: entry 2 ``: empty entry (two commas in a row, or a comma at an end?)",
            ),
            ("@h1", "--hosts: entry 1 `@h1`: empty user name before `@`"),
            (
                "h1:0",
                "--hosts: entry 1 `h1:0`: bad port `0` (expected 1-65535)",
            ),
            (
                "h1:99999",
                "--hosts: entry 1 `h1:99999`: bad port `99999` (expected 1-65535)",
            ),
            (
                "h1:",
                "--hosts: entry 1 `h1:`: bad port `` (expected 1-65535)",
            ),
            (":22", "--hosts: entry 1 `:22`: no host name"),
            (
                "-oProxyCommand=x",
                "--hosts: entry 1 `-oProxyCommand=x`: a host name must not start with `-`",
            ),
            (
                "-l@h",
                "--hosts: entry 1 `-l@h`: a user name must not start with `-`",
            ),
            ("a b", "--hosts: entry 1 `a b`: host name `a b` has ' '"),
            (
                "u;x@h",
                "--hosts: entry 1 `u;x@h`: user name `u;x` has ';'; allowed are letters, digits, `.`, `_` and `-`",
            ),
            (
                "::1:2222x",
                "--hosts: entry 1 `::1:2222x`: `::1:2222x` is not an IPv6 address; with a port, write it as `[ADDRESS]:PORT`",
            ),
            ("[::1", "--hosts: entry 1 `[::1`: `[` without a closing `]`"),
            (
                "[h1]:22",
                "--hosts: entry 1 `[h1]:22`: `h1` in brackets is not an IPv6 address",
            ),
            (
                "[::1]2222",
                "--hosts: entry 1 `[::1]2222`: unexpected `2222` after `]` (expected `:PORT`)",
            ),
            ("h1,h2,h1", "--hosts: entry 3 `h1`: repeats entry 1"),
            ("", "--hosts: the list is empty"),
        ];
        for (list, message) in cases {
            let err = parse_hosts(list).expect_err(list);
            assert_eq!(err.to_string(), message, "for {list:?}");
        }
    }

    #[test]
    fn same_address_for_different_users_or_ports_is_allowed() {
        let hosts = parse_hosts("a@h,b@h,h:2222,h").unwrap();
        assert_eq!(hosts.len(), 4);
    }
}
