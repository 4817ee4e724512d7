//! Address parsing with the leniency of Kubernetes' `netutils.ParseIPSloppy` /
//! `ParseCIDRSloppy` (IPv4 octets may carry leading zeros, read as decimal) and Go's
//! `net.SplitHostPort`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::model::Cidr;

/// Parses an IP like `netutils.ParseIPSloppy`: IPv4 octets may have leading zeros
/// (`010.0.0.1` is `10.0.0.1`); IPv4-mapped IPv6 addresses come back as IPv4, as Go's
/// `To4()` treats them.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        let ip: IpAddr = s.parse().ok()?;
        return Some(ip.to_canonical());
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u32 = part.parse().ok()?;
        *octet = u8::try_from(n).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Parses a CIDR like `netutils.ParseCIDRSloppy`; host bits are cleared.
pub fn parse_cidr_sloppy(s: &str) -> Option<Cidr> {
    let (ip, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    // Keep the family as written: "::ffff:1.2.3.0/120" is an IPv6 prefix in Go.
    let ip: IpAddr = if ip.contains(':') {
        ip.parse().ok()?
    } else {
        parse_ip_sloppy(ip)?
    };
    Cidr::new(ip, len)
}

/// Splits `host:port` / `[v6]:port` like Go's `net.SplitHostPort`.
pub fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| format!("address {s}: missing ']' in address"))?;
        let host = &rest[..end];
        let after = &rest[end + 1..];
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| format!("address {s}: missing port in address"))?;
        if port.contains(':') {
            return Err(format!("address {s}: too many colons in address"));
        }
        return Ok((host, port));
    }
    let idx = s
        .rfind(':')
        .ok_or_else(|| format!("address {s}: missing port in address"))?;
    let host = &s[..idx];
    if host.contains(':') {
        return Err(format!("address {s}: too many colons in address"));
    }
    if host.contains('[') || host.contains(']') {
        return Err(format!("address {s}: unexpected bracket in address"));
    }
    Ok((host, &s[idx + 1..]))
}

/// `proxyutil.AppendPortIfNeeded`: a bare IP gets `:port` (IPv6 bracketed); anything else
/// (already `ip:port`, empty, garbage) is returned unchanged.
pub fn append_port_if_needed(addr: &str, port: u16) -> String {
    if let Ok((host, _)) = split_host_port(addr)
        && parse_ip_sloppy(host).is_some()
    {
        return addr.to_string();
    }
    match parse_ip_sloppy(addr) {
        Some(IpAddr::V4(_)) => format!("{addr}:{port}"),
        Some(IpAddr::V6(_)) => format!("[{addr}]:{port}"),
        None => addr.to_string(),
    }
}

/// Parses a port number as Go's `strconv.Atoi` would, then checks 1..=65535.
pub fn parse_port(s: &str) -> Option<u16> {
    let digits = s.strip_prefix('+').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// Parses `ip:port` (sloppy IP) into a socket address.
pub fn parse_host_port(s: &str) -> Option<SocketAddr> {
    let (host, port) = split_host_port(s).ok()?;
    Some(SocketAddr::new(parse_ip_sloppy(host)?, parse_port(port)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ip_accepts_leading_zeros_and_maps_v4_in_v6() {
        assert_eq!(parse_ip_sloppy("010.000.0.01"), "10.0.0.1".parse().ok());
        assert_eq!(parse_ip_sloppy("::ffff:1.2.3.4"), "1.2.3.4".parse().ok());
        assert_eq!(parse_ip_sloppy("fd00::1"), "fd00::1".parse().ok());
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.-4",
            "x",
            "1.2.3.4/8",
        ] {
            assert_eq!(parse_ip_sloppy(bad), None, "{bad}");
        }
    }

    #[test]
    fn sloppy_cidr_and_host_port() {
        assert_eq!(
            parse_cidr_sloppy("010.1.2.3/8").map(|c| c.to_string()),
            Some("10.0.0.0/8".to_string())
        );
        assert_eq!(parse_cidr_sloppy("10.0.0.0/33"), None);
        assert_eq!(parse_cidr_sloppy("10.0.0.0"), None);
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1", "80")));
        assert_eq!(split_host_port("1.2.3.4:80"), Ok(("1.2.3.4", "80")));
        assert!(split_host_port("::1").is_err());
        assert!(split_host_port("1.2.3.4").is_err());
        assert_eq!(append_port_if_needed("1.2.3.4", 10256), "1.2.3.4:10256");
        assert_eq!(append_port_if_needed("::", 10256), "[::]:10256");
        assert_eq!(append_port_if_needed("1.2.3.4:99", 10256), "1.2.3.4:99");
        assert_eq!(append_port_if_needed("", 10256), "");
        assert_eq!(
            parse_host_port("[::1]:10249"),
            Some("[::1]:10249".parse().unwrap())
        );
        assert_eq!(parse_host_port("1.2.3.4:0"), None);
        assert_eq!(parse_host_port("1.2.3.4:65536"), None);
    }
}
