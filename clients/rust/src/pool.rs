//! Many endpoints behind one client: a fixed list, or a DNS name (e.g. a headless
//! Kubernetes Service) re-resolved periodically; calls spread by round robin, and an
//! endpoint that failed is skipped, with a backoff that doubles per failure, until it
//! answers again.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::grpc::{Channel, ChannelOptions, Code, Status, Target};

/// How often a DNS target is looked up again (after an endpoint failed, a tenth of
/// this; while it resolves to nothing, on every call).
pub const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// One endpoint: its connection and how it has done lately.
pub(crate) struct Endpoint {
    pub(crate) channel: Channel,
    health: Mutex<EndpointHealth>,
    calls: AtomicU64,
}

#[derive(Default)]
struct EndpointHealth {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Endpoint {
    fn new(target: Target, options: &ChannelOptions) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            channel: Channel::lazy(target, options.clone()),
            health: Mutex::new(EndpointHealth::default()),
            calls: AtomicU64::new(0),
        })
    }

    pub(crate) fn target(&self) -> &Target {
        self.channel.target()
    }

    fn backed_off_until(&self) -> Option<Instant> {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.retry_at.filter(|t| *t > Instant::now())
    }
}

enum Source {
    Fixed,
    Dns {
        host: String,
        port: u16,
        every: Duration,
    },
}

struct Resolved {
    endpoints: Vec<Arc<Endpoint>>,
    at: Option<Instant>,
    error: Option<String>,
    /// An endpoint failed: look up again after a tenth of the period.
    soon: bool,
}

struct Inner {
    source: Source,
    name: String,
    options: ChannelOptions,
    resolved: Mutex<Resolved>,
    resolving: tokio::sync::Mutex<()>,
    next: AtomicUsize,
}

/// The endpoints of a client. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.name)
    }
}

impl Pool {
    /// `dns:///host:port` (or `dns:host:port`), a comma-separated list, or one
    /// target (`unix:PATH`, a path, `host:port`).
    pub(crate) fn parse(target: &str, options: ChannelOptions) -> Result<Pool, Status> {
        if let Some(name) = target.strip_prefix("dns:") {
            let name = name.trim_start_matches('/');
            let invalid = || {
                Status::new(
                    Code::InvalidArgument,
                    format!(
                        "invalid target {:?}: expected dns:///host:port, e.g. dns:///embed-pool.ns.svc:50051",
                        target
                    ),
                )
            };
            let (host, port) = name.rsplit_once(':').ok_or_else(invalid)?;
            let port: u16 = port.parse().map_err(|_| invalid())?;
            if host.is_empty() {
                return Err(invalid());
            }
            return Ok(Pool::dns(host, port, DEFAULT_RESOLVE_EVERY, options));
        }
        let parts: Vec<&str> = target.split(',').map(str::trim).collect();
        Pool::fixed(&parts, options)
    }

    pub(crate) fn fixed(targets: &[&str], options: ChannelOptions) -> Result<Pool, Status> {
        if targets.is_empty() {
            return Err(Status::new(
                Code::InvalidArgument,
                "no endpoints given: name at least one socket path or host:port",
            ));
        }
        let parsed = targets
            .iter()
            .map(|t| Target::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        let name = parsed
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let endpoints = parsed
            .into_iter()
            .map(|t| Endpoint::new(t, &options))
            .collect();
        Ok(Pool::with(Source::Fixed, name, options, endpoints))
    }

    pub(crate) fn dns(host: &str, port: u16, every: Duration, options: ChannelOptions) -> Pool {
        let source = Source::Dns {
            host: host.to_string(),
            port,
            every,
        };
        Pool::with(
            source,
            format!("dns:///{}:{}", host, port),
            options,
            Vec::new(),
        )
    }

    fn with(
        source: Source,
        name: String,
        options: ChannelOptions,
        endpoints: Vec<Arc<Endpoint>>,
    ) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                source,
                name,
                options,
                resolved: Mutex::new(Resolved {
                    endpoints,
                    at: None,
                    error: None,
                    soon: false,
                }),
                resolving: tokio::sync::Mutex::new(()),
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// One fixed endpoint: no failover (a single sidecar behaves as it always did).
    pub(crate) fn is_single(&self) -> bool {
        matches!(self.inner.source, Source::Fixed) && self.endpoints().len() == 1
    }

    pub(crate) fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.lock().endpoints.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Resolved> {
        self.inner
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Calls started per endpoint, in the pool's order.
    pub(crate) fn calls(&self) -> Vec<(String, u64)> {
        self.endpoints()
            .iter()
            .map(|e| (e.target().to_string(), e.calls.load(Ordering::Relaxed)))
            .collect()
    }

    /// Looks the DNS name up again if it is time (or it has no addresses).
    async fn refresh(&self) {
        let (host, port, every) = match &self.inner.source {
            Source::Fixed => return,
            Source::Dns { host, port, every } => (host.clone(), *port, *every),
        };
        let stale = |r: &Resolved| match r.at {
            None => true,
            Some(at) => {
                r.endpoints.is_empty()
                    || at.elapsed() >= every
                    || (r.soon && at.elapsed() >= every / 10)
            }
        };
        if !stale(&self.lock()) {
            return;
        }
        let _one_at_a_time = self.inner.resolving.lock().await;
        if !stale(&self.lock()) {
            return;
        }
        let looked_up = tokio::net::lookup_host((host.as_str(), port)).await;
        let mut resolved = self.lock();
        resolved.at = Some(Instant::now());
        resolved.soon = false;
        match looked_up {
            Ok(addresses) => {
                let mut fresh: Vec<Arc<Endpoint>> = Vec::new();
                for address in addresses {
                    let target = Target::Tcp(address.to_string());
                    if fresh.iter().any(|e| *e.target() == target) {
                        continue;
                    }
                    // Keep the connection (and the health) of an address still there.
                    let kept = resolved
                        .endpoints
                        .iter()
                        .find(|e| *e.target() == target)
                        .cloned();
                    fresh.push(kept.unwrap_or_else(|| Endpoint::new(target, &self.inner.options)));
                }
                resolved.error = if fresh.is_empty() {
                    Some("it resolved to no addresses".to_string())
                } else {
                    None
                };
                resolved.endpoints = fresh;
            }
            // Keep the last addresses: a resolver hiccup must not empty the pool.
            Err(e) => resolved.error = Some(format!("looking it up failed: {}", e)),
        }
    }

    /// The next endpoint by round robin, skipping those in backoff; if every one is
    /// in backoff, the one whose backoff ends first (so a call never waits on it).
    pub(crate) async fn pick(&self) -> Result<Arc<Endpoint>, Status> {
        self.refresh().await;
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            let why = self.lock().error.clone().unwrap_or_default();
            return Err(Status::unavailable(format!(
                "no endpoints for {}: {}",
                self.inner.name, why
            )));
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let n = endpoints.len();
        let mut soonest: Option<(Instant, &Arc<Endpoint>)> = None;
        for k in 0..n {
            let endpoint = &endpoints[(start + k) % n];
            match endpoint.backed_off_until() {
                None => {
                    endpoint.calls.fetch_add(1, Ordering::Relaxed);
                    return Ok(endpoint.clone());
                }
                Some(until) => {
                    if soonest.map_or(true, |(t, _)| until < t) {
                        soonest = Some((until, endpoint));
                    }
                }
            }
        }
        let endpoint = soonest.expect("n > 0").1.clone();
        endpoint.calls.fetch_add(1, Ordering::Relaxed);
        Ok(endpoint)
    }

    /// The endpoint could not be reached or refused the call: skip it for a while.
    pub(crate) fn failed(&self, endpoint: &Endpoint) {
        let mut health = endpoint.health.lock().unwrap_or_else(|e| e.into_inner());
        health.failures = health.failures.saturating_add(1);
        let backoff = BACKOFF_FIRST
            .checked_mul(1 << (health.failures - 1).min(16))
            .unwrap_or(BACKOFF_CAP)
            .min(BACKOFF_CAP);
        health.retry_at = Some(Instant::now() + backoff);
        drop(health);
        // Pods come and go: look the name up again soon.
        self.lock().soon = true;
    }

    pub(crate) fn succeeded(&self, endpoint: &Endpoint) {
        let mut health = endpoint.health.lock().unwrap_or_else(|e| e.into_inner());
        health.failures = 0;
        health.retry_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(pool: &Pool) -> Vec<String> {
        pool.endpoints()
            .iter()
            .map(|e| e.target().to_string())
            .collect()
    }

    #[tokio::test]
    async fn round_robin_skips_an_endpoint_in_backoff_until_it_ends() {
        let pool = Pool::parse("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", Default::default()).unwrap();
        assert!(!pool.is_single());
        let mut picked = Vec::new();
        for _ in 0..6 {
            picked.push(pool.pick().await.unwrap().target().to_string());
        }
        assert_eq!(&picked[..3], &names(&pool)[..]);
        assert_eq!(&picked[3..], &names(&pool)[..]);

        let second = pool.endpoints()[1].clone();
        pool.failed(&second);
        for _ in 0..6 {
            assert_ne!(pool.pick().await.unwrap().target(), second.target());
        }
        pool.succeeded(&second);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(pool.pick().await.unwrap().target().to_string());
        }
        assert!(seen.contains(&second.target().to_string()));
    }

    #[tokio::test]
    async fn with_every_endpoint_in_backoff_the_soonest_is_tried() {
        let pool = Pool::parse("127.0.0.1:1,127.0.0.1:2", Default::default()).unwrap();
        let [a, b] = [pool.endpoints()[0].clone(), pool.endpoints()[1].clone()];
        pool.failed(&a);
        pool.failed(&a); // longer backoff
        pool.failed(&b);
        for _ in 0..3 {
            assert_eq!(pool.pick().await.unwrap().target(), b.target());
        }
    }

    #[tokio::test]
    async fn a_dns_target_resolves_to_its_addresses() {
        let pool = Pool::parse("dns:///localhost:50051", Default::default()).unwrap();
        assert!(!pool.is_single());
        let endpoint = pool.pick().await.unwrap();
        assert!(endpoint.target().to_string().ends_with(":50051"));
        assert!(!pool.endpoints().is_empty());
        let bad = Pool::parse("dns:///no-such-host.invalid:50051", Default::default()).unwrap();
        let err = bad.pick().await.err().expect("no addresses");
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("no-such-host.invalid"), "{}", err);
        assert_eq!(
            Pool::parse("dns:///nameonly", Default::default())
                .err()
                .unwrap()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn one_target_is_a_single_endpoint() {
        assert!(Pool::parse("unix:/tmp/x.sock", Default::default())
            .unwrap()
            .is_single());
        assert!(Pool::parse("127.0.0.1:5", Default::default())
            .unwrap()
            .is_single());
    }
}
