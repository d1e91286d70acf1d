//! `http(s)` image URLs in chat requests: fetched only from a host in `allowed_image_hosts`, at
//! an address outside the private and special ranges (unless `allowed_image_networks` lists
//! it), and through redirects only to a target that passes the same checks, within
//! `image_fetch_timeout_secs` and `max_body_bytes`. Without all of these, one allowed host that
//! redirects (or a name that resolves to an internal address) lets any client make the server
//! fetch from its own network: cloud metadata services, admin ports, other tenants.
//!
//! Each hop is resolved once, its addresses checked, and the connection made to exactly those
//! addresses: a second lookup by the HTTP client could answer differently (DNS rebinding).

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use url::{Host, Url};

use crate::error::{ApiError, ApiResult, ErrorKind};

/// Redirects followed before giving up; each one is checked like the first URL.
pub const MAX_REDIRECTS: usize = 5;

/// What may be fetched, from the configuration.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Hosts as `url` serialises them (lowercase, IDNA-encoded, IPv6 in brackets).
    pub hosts: Vec<String>,
    /// Networks allowed although they are in a refused range.
    pub networks: Vec<IpNet>,
    /// For the whole fetch: connecting, every redirect and the body.
    pub timeout: Duration,
    pub max_bytes: usize,
}

impl FetchPolicy {
    /// `hosts` as configured; each must be a bare host name or address (checked at start-up).
    pub fn new(hosts: &[String], networks: &[IpNet], timeout: Duration, max_bytes: usize) -> Result<Self, String> {
        let hosts = hosts.iter().map(|h| normalise_host(h)).collect::<Result<_, _>>()?;
        Ok(Self { hosts, networks: networks.to_vec(), timeout, max_bytes })
    }

    fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h == host)
    }

    fn allows_address(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(&ip)) || refused_range(ip).is_none()
    }
}

/// An `allowed_image_hosts` entry as URLs spell their host, or why it is not a host.
pub fn normalise_host(entry: &str) -> Result<String, String> {
    match Host::parse(entry) {
        Ok(host) if !entry.is_empty() => Ok(host.to_string()),
        _ => Err(format!("`{entry}` is not a host name or address (no scheme, port or path)")),
    }
}

/// Whether the URL is one this module fetches (the rest are `data:` or refused).
pub fn is_remote(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The image at `url`, checked at every hop. Blocking: run it off the async threads.
pub fn fetch(url: &str, policy: &FetchPolicy) -> ApiResult<Vec<u8>> {
    let deadline = Instant::now() + policy.timeout;
    let mut url = Url::parse(url).map_err(|e| ApiError::new(ErrorKind::InvalidImageUrl, format!("image URL `{url}`: {e}")))?;
    let mut from: Option<String> = None;
    for _ in 0..=MAX_REDIRECTS {
        let host = checked_host(&url, policy, from.as_deref())?;
        let addresses = resolve(&url, &host, policy)?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(fetch_failed(&host, format!("no answer within image_fetch_timeout_secs ({} s)", policy.timeout.as_secs())));
        }
        let agent = ureq::AgentBuilder::new()
            // Redirects are followed here, hop by hop, each one checked.
            .redirects(0)
            // A proxy would connect wherever it was told, past the address check.
            .try_proxy_from_env(false)
            .timeout_connect(remaining)
            .timeout(remaining)
            // Connect to the addresses just checked, never to a fresh lookup's.
            .resolver(move |_: &str| Ok::<_, std::io::Error>(addresses.clone()))
            .build();
        let response = match agent.get(url.as_str()).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(status, _)) => return Err(fetch_failed(&host, format!("it answered {status}"))),
            Err(e) => return Err(fetch_failed(&host, e.to_string())),
        };
        if (300..400).contains(&response.status()) {
            let location = response.header("location").ok_or_else(|| fetch_failed(&host, "a redirect without a Location".into()))?;
            url = url.join(location).map_err(|e| fetch_failed(&host, format!("a redirect to `{location}`: {e}")))?;
            from = Some(host);
            continue;
        }
        return read_capped(response, &host, policy.max_bytes);
    }
    Err(fetch_failed(from.as_deref().unwrap_or(""), format!("more than {MAX_REDIRECTS} redirects")))
}

/// The URL's host if it is an allowed one over http(s); `from` names the host that redirected here.
fn checked_host(url: &Url, policy: &FetchPolicy, from: Option<&str>) -> ApiResult<String> {
    let host = url.host_str().unwrap_or("").to_string();
    let via = from.map(|f| format!(" (a redirect from `{f}`)")).unwrap_or_default();
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ApiError::new(
            ErrorKind::RemoteImageNotAllowed,
            format!("image URL{via} uses `{}:`; only http(s) is fetched", url.scheme()),
        ));
    }
    if !policy.allows_host(&host) {
        let message =
            format!("image URLs from `{host}`{via} are not allowed: send the image as a data: URL, or add the host to allowed_image_hosts");
        return Err(ApiError::new(ErrorKind::RemoteImageNotAllowed, message));
    }
    Ok(host)
}

/// The URL's addresses, each checked: those in a refused range are dropped, and when none is
/// left the fetch is refused before any connection is made.
fn resolve(url: &Url, host: &str, policy: &FetchPolicy) -> ApiResult<Vec<SocketAddr>> {
    let port = url.port_or_known_default().unwrap_or(80);
    let found: Vec<SocketAddr> = match url.host() {
        Some(Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(Host::Domain(name)) => {
            (name, port).to_socket_addrs().map_err(|e| fetch_failed(host, format!("cannot resolve it: {e}")))?.collect()
        }
        None => return Err(ApiError::new(ErrorKind::InvalidImageUrl, "image URL without a host")),
    };
    let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = found.into_iter().partition(|a| policy.allows_address(a.ip()));
    if allowed.is_empty() {
        let Some(first) = refused.first() else { return Err(fetch_failed(host, "it resolves to no address".into())) };
        let range = refused_range(first.ip()).unwrap_or("refused");
        let message = format!(
            "image host `{host}` resolves to {}, a {range} address: such addresses are fetched only when allowed_image_networks lists them",
            first.ip()
        );
        return Err(ApiError::new(ErrorKind::RemoteImageNotAllowed, message));
    }
    Ok(allowed)
}

/// The body, refusing more than `limit` bytes (413) without holding more than that.
fn read_capped(response: ureq::Response, host: &str, limit: usize) -> ApiResult<Vec<u8>> {
    let too_large = || ApiError::new(ErrorKind::ImageTooLarge, format!("the image from `{host}` is over max_body_bytes ({limit})"));
    if response.header("content-length").and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    response.into_reader().take(limit as u64 + 1).read_to_end(&mut bytes).map_err(|e| fetch_failed(host, e.to_string()))?;
    if bytes.len() > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

fn fetch_failed(host: &str, reason: String) -> ApiError {
    ApiError::new(ErrorKind::ImageFetchFailed, format!("fetching the image from `{host}` failed: {reason}"))
}

/// The kind of range `ip` is in when it is not a public unicast address: loopback, private
/// (RFC 1918, unique local), link-local (which holds the cloud metadata address
/// 169.254.169.254), carrier-grade NAT, and the unspecified, multicast, broadcast, reserved,
/// documentation and benchmarking ranges. IPv6 forms that carry an IPv4 address (mapped,
/// NAT64, 6to4, Teredo) are refused as a whole: they can reach any IPv4 address.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => refused_v4(v4).or(Some("IPv4-mapped")),
            None => refused_v6(v6),
        },
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local (cloud metadata)",
        (100, 64..=127, _) => "carrier-grade NAT",
        (0, _, _) => "unspecified",
        _ if ip.is_broadcast() || a >= 240 => "reserved",
        _ if ip.is_multicast() => "multicast",
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "reserved",
        (198, 18..=19, _) => "benchmarking",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(match s {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        [first, ..] if first & 0xfe00 == 0xfc00 => "private (unique local)",
        [first, ..] if first & 0xffc0 == 0xfe80 => "link-local",
        // IPv4-compatible (deprecated), NAT64, 6to4, Teredo: they embed an IPv4 address.
        [0, 0, 0, 0, 0, 0, ..] | [0x64, 0xff9b, ..] | [0x2002, ..] | [0x2001, 0, ..] => "IPv4-translating",
        [0x2001, 0xdb8, ..] => "documentation",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_refused_and_public_ones_are_not() {
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ];
        for ip in refused {
            assert!(refused_range(ip.parse().unwrap()).is_some(), "{ip} should be refused");
        }
        for ip in ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "172.32.0.1", "100.128.0.1"] {
            assert_eq!(refused_range(ip.parse().unwrap()), None, "{ip} is public");
        }
    }

    #[test]
    fn a_listed_network_is_allowed_and_only_it() {
        let policy = FetchPolicy::new(&[], &["127.0.0.0/8".parse().unwrap()], Duration::from_secs(1), 1).unwrap();
        assert!(policy.allows_address("127.0.0.1".parse().unwrap()));
        assert!(!policy.allows_address("10.0.0.1".parse().unwrap()));
        assert!(!policy.allows_address("::1".parse().unwrap()));
    }

    #[test]
    fn hosts_are_compared_as_urls_spell_them() {
        assert_eq!(normalise_host("Images.Example.COM").unwrap(), "images.example.com");
        assert_eq!(normalise_host("[::1]").unwrap(), "[::1]");
        for bad in ["https://example.com", "example.com:443", "example.com/x", ""] {
            assert!(normalise_host(bad).is_err(), "{bad}");
        }
    }
}
