//! Where the canary may send requests a plan asked for: the operator's
//! allow-list of networks (`DEVFLEET_CANARY_ALLOWED_NETWORKS`).
//!
//! A plan names its health source (a counter URL or a Prometheus server),
//! so without a check a plan could make the canary fetch any address its
//! host can reach: a cloud metadata service (169.254.169.254), a database
//! on loopback, an admin port on the internal network. The check is made
//! on the address actually connected to, not on the URL's text:
//!
//! * a host name is resolved by [`GuardedResolver`] (reqwest's
//!   `dns_resolver`), which drops every resolved address outside the
//!   allow-list and fails when none is left; the connection can only go to
//!   an address it returned, so a name that resolves to an allowed address
//!   once and to a forbidden one later (DNS rebinding) is checked again at
//!   every connect;
//! * an IP literal never reaches a resolver (hyper connects to it
//!   directly), so [`AllowList::check_url`] checks it before the request;
//! * every redirect is checked by the client's redirect policy (its target's
//!   IP literal, its scheme), and its host name goes through the resolver
//!   like the first one;
//! * proxies are off (a proxy would resolve and connect for us).
//!
//! An empty list allows nothing: every plan's health read then fails with an
//! error naming the setting.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;

/// One allowed network: an address and a prefix length (`10.0.0.0/8`,
/// `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{text}' is not an IP network (like 10.0.0.0/8 or ::1/128)"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{text}': the prefix length must be 0..={max}"))?,
        };
        Ok(Network { addr, prefix })
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Network {
    /// Whether `ip` lies in this network (IPv4-mapped IPv6 addresses count
    /// as their IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |prefix: u8, width: u32| -> u128 {
            if prefix == 0 {
                0
            } else {
                (!0u128 << (width - u32::from(prefix))) & (!0u128 >> (128 - width))
            }
        };
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = bits(self.prefix, 32);
                u128::from(u32::from(net)) & mask == u128::from(u32::from(ip)) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = bits(self.prefix, 128);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The networks plan-named URLs may connect to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    networks: Vec<Network>,
}

impl std::str::FromStr for AllowList {
    type Err = String;
    /// Comma-separated networks; empty allows nothing.
    fn from_str(text: &str) -> Result<Self, String> {
        let networks = text
            .split(',')
            .filter(|n| !n.trim().is_empty())
            .map(str::parse)
            .collect::<Result<_, String>>()
            .map_err(|e| format!("{e} (DEVFLEET_CANARY_ALLOWED_NETWORKS)"))?;
        Ok(AllowList { networks })
    }
}

impl AllowList {
    /// Loopback only (`127.0.0.0/8`, `::1/128`): what `devfleet up` uses.
    pub fn loopback() -> Self {
        "127.0.0.0/8,::1/128".parse().unwrap_or_default()
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether `ip` lies in an allowed network.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// Why `ip` is refused, naming the setting.
    fn refusal(&self, what: &str, ip: IpAddr) -> String {
        let allowed = if self.networks.is_empty() {
            "nothing is allowed".to_owned()
        } else {
            let list: Vec<String> = self.networks.iter().map(|n| n.to_string()).collect();
            format!("allowed: {}", list.join(", "))
        };
        format!(
            "{what} is {ip}, outside the canary's allowed networks (DEVFLEET_CANARY_ALLOWED_NETWORKS; {allowed})"
        )
    }

    /// Checks what can be checked of a URL before connecting: an http(s)
    /// scheme, and an IP-literal host against the list (a host name is
    /// checked by the resolver, at connect time).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{url}: only http and https are allowed"));
        }
        let Some(host) = url.host_str() else {
            return Err(format!("{url} has no host"));
        };
        // The URL parser normalises IP hosts (`0x7f.1` is `127.0.0.1`; IPv6
        // comes in brackets); anything else is a name for the resolver.
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(());
        };
        if self.allows(ip) {
            Ok(())
        } else {
            Err(self.refusal(&format!("the address of {url}"), ip))
        }
    }

    /// An HTTP client for plan-named URLs: resolves through
    /// [`GuardedResolver`], re-checks every redirect, uses no proxy, and
    /// gives up after `timeout`. Callers still call [`AllowList::check_url`]
    /// before each request (IP literals bypass the resolver).
    pub fn client(&self, timeout: Duration) -> anyhow::Result<reqwest::Client> {
        let allow = self.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match allow.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(format!("redirect refused: {reason}")),
            }
        });
        reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .redirect(redirects)
            .dns_resolver(Arc::new(GuardedResolver {
                allow: self.clone(),
            }))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the guarded HTTP client: {e}"))
    }
}

/// A DNS resolver that returns only allowed addresses (the system's
/// resolver, filtered).
pub struct GuardedResolver {
    allow: AllowList,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| allow.allows(a.ip()))
                .collect();
            match (allowed.is_empty(), resolved.first()) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as Addrs),
                (true, Some(first)) => {
                    Err(allow.refusal(&format!("'{host}' resolves to {first}: it"), first.ip()))?
                }
                (true, None) => Err(format!("'{host}' resolves to no address"))?,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn list(text: &str) -> AllowList {
        text.parse().unwrap()
    }

    #[test]
    fn networks_contain_what_their_prefix_says() {
        let l = list("10.0.0.0/8, 192.168.1.7, ::1/128, fd00::/8");
        for ok in [
            "10.1.2.3",
            "192.168.1.7",
            "::1",
            "fd12::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(l.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "11.0.0.1",
            "192.168.1.8",
            "127.0.0.1",
            "169.254.169.254",
            "fe80::1",
        ] {
            assert!(!l.allows(no.parse().unwrap()), "{no}");
        }
        assert!(list("0.0.0.0/0").allows("8.8.8.8".parse().unwrap()));
        assert!(!AllowList::default().allows("127.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/a", "::1/129"] {
            assert!(bad.parse::<AllowList>().is_err(), "{bad}");
        }
    }

    /// A server that counts its requests; `/go` redirects to `target`.
    async fn server(bind: &str, target: Option<String>) -> (SocketAddr, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new()
            .route(
                "/ok",
                get(move || {
                    h.fetch_add(1, Ordering::SeqCst);
                    async { "ok" }
                }),
            )
            .route(
                "/go",
                get(move || {
                    let to = target.clone().unwrap_or_default();
                    async move { axum::response::Redirect::temporary(&to) }
                }),
            );
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, hits)
    }

    async fn get_url(allow: &AllowList, url: &str) -> Result<String, String> {
        let url = reqwest::Url::parse(url).unwrap();
        allow.check_url(&url)?;
        let client = allow.client(Duration::from_secs(10)).unwrap();
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| crate::handler::error_chain(&e))?;
        response.text().await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_disallowed_address_is_refused_and_an_allowed_one_is_read() {
        let (addr, hits) = server("127.0.0.1:0", None).await;
        let url = format!("http://{addr}/ok");
        let err = get_url(&list("10.0.0.0/8"), &url).await.unwrap_err();
        assert!(err.contains("DEVFLEET_CANARY_ALLOWED_NETWORKS"), "{err}");
        let err = get_url(
            &list("10.0.0.0/8"),
            "http://169.254.169.254/latest/meta-data/",
        )
        .await
        .unwrap_err();
        assert!(err.contains("169.254.169.254"), "{err}");
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        assert_eq!(get_url(&list("127.0.0.1/32"), &url).await.unwrap(), "ok");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_host_name_resolving_to_a_disallowed_address_is_refused() {
        // `localhost` resolves to loopback; only another network is allowed.
        let (addr, hits) = server("127.0.0.1:0", None).await;
        let url = format!("http://localhost:{}/ok", addr.port());
        let err = get_url(&list("10.0.0.0/8"), &url).await.unwrap_err();
        assert!(
            err.contains("'localhost' resolves to")
                && err.contains("DEVFLEET_CANARY_ALLOWED_NETWORKS"),
            "{err}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        assert_eq!(
            get_url(&list("127.0.0.0/8,::1/128"), &url).await.unwrap(),
            "ok"
        );
    }

    #[tokio::test]
    async fn a_redirect_to_a_disallowed_address_is_refused() {
        // The forbidden server is on 127.0.0.1; the allowed ones on
        // 127.0.0.2 (loopback too, but the only allowed network) redirect
        // to it by address and by name.
        let (forbidden, forbidden_hits) = server("127.0.0.1:0", None).await;
        let (by_ip, _) = server("127.0.0.2:0", Some(format!("http://{forbidden}/ok"))).await;
        let (by_name, _) = server(
            "127.0.0.2:0",
            Some(format!("http://localhost:{}/ok", forbidden.port())),
        )
        .await;
        let allow = list("127.0.0.2/32");
        let err = get_url(&allow, &format!("http://{by_ip}/go"))
            .await
            .unwrap_err();
        assert!(
            err.contains("redirect refused") && err.contains("127.0.0.1"),
            "{err}"
        );
        let err = get_url(&allow, &format!("http://{by_name}/go"))
            .await
            .unwrap_err();
        assert!(err.contains("'localhost' resolves to"), "{err}");
        assert_eq!(forbidden_hits.load(Ordering::SeqCst), 0);
        // Allowing the target lets the same redirect through.
        let both = list("127.0.0.0/8");
        assert_eq!(
            get_url(&both, &format!("http://{by_ip}/go")).await.unwrap(),
            "ok"
        );
        assert_eq!(forbidden_hits.load(Ordering::SeqCst), 1);
    }
}
