//! Addresses other processes dial: one check for every flag and request that names one (a peer in
//! `--peers` or `--clients`, a member added at run time, a MapReduce worker's `--advertise`), so
//! none accepts an address that no other process could reach.

/// Whether `address` is `HOST:PORT` another process could dial: a non-empty host name or a specific
/// IP — an IPv6 one in brackets, as in a URI (without them its last group would be read as the
/// port), never the unspecified `0.0.0.0` or `::` (a listener's "every interface", which names no
/// host) — and a non-zero port. No scheme, path or user: a URL is refused; so is an IPv6 zone
/// (`%eth0`), which names an interface of one host only.
pub fn is_dialable(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    let host = match host.strip_prefix('[') {
        Some(inner) => match inner.strip_suffix(']') {
            Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => ip,
            _ => return false,
        },
        // A name or an IPv4 address: letters, digits, '.', '-' and '_' (a space or a '#' in an
        // added member's address would be kept in every configuration and fail every dial).
        None if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) =>
        {
            return false
        }
        None => host,
    };
    let unspecified = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    !host.is_empty() && !unspecified && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::is_dialable;

    #[test]
    fn only_addresses_another_process_can_dial_pass() {
        for good in [
            "kv-0:7000",
            "127.0.0.1:1",
            "[::1]:7000",
            "a.b.example:65535",
        ] {
            assert!(is_dialable(good), "{good}");
        }
        for bad in [
            "",
            "kv-0",
            ":7000",
            "kv-0:",
            "kv-0:0",
            "kv-0:65536",
            "kv-0:x",
            "0.0.0.0:7000",
            "[::]:7000",
            "::1:7000",
            "[kv-0]:7000",
            "http://kv-0:7000",
            "user@kv-0:7000",
            "kv-0/x:7000",
            "kv 3:7000",
            "a#b:7000",
            "[fe80::1%eth0]:7000",
        ] {
            assert!(!is_dialable(bad), "{bad:?}");
        }
    }
}
