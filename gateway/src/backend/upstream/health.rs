//! The pool's members over time: resolving the configured host names again before each probe
//! round ([`super::Discovery::Dns`]), and probing every member's `/health`, ejecting the ones
//! that fail and readmitting them when they answer again; a worker's answer also says which
//! LoRA adapters it holds.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;

use super::{base_url, Member, MemberSet, PROBE_EVERY, PROBE_TIMEOUT};

/// The addresses a host name resolves to.
pub(super) async fn lookup(host: String, port: u16) -> std::io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((host.as_str(), port))
        .await?
        .map(|a| a.ip())
        .collect())
}

/// Resolves every URL with `resolve` and replaces the members with one per address, keeping
/// the members (their health and requests in flight) of addresses seen before. A URL that
/// fails to resolve keeps its members until it resolves again; one that resolves to nothing
/// (no Ready pod behind a headless Service) has none. `failing` (one flag per URL) keeps the
/// log to one line when a URL starts failing and one when it resolves again.
pub(super) async fn discover<F, Fut>(
    members: &MemberSet,
    urls: &[reqwest::Url],
    failing: &mut [bool],
    resolve: F,
) where
    F: Fn(String, u16) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let old = members.current();
    let by_base: HashMap<&str, &Arc<Member>> = old.iter().map(|m| (m.base.as_str(), m)).collect();
    let mut next: Vec<Arc<Member>> = Vec::new();
    for (origin, url) in urls.iter().enumerate() {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            continue;
        };
        let failed = failing.get_mut(origin);
        let ips = match resolve(host.trim_matches(['[', ']']).to_string(), port).await {
            Ok(ips) => {
                if let Some(f) = failed.filter(|f| **f) {
                    *f = false;
                    tracing::info!(url = %url, "the upstream's host resolves again");
                }
                ips
            }
            Err(e) => {
                if let Some(f) = failed.filter(|f| !**f) {
                    *f = true;
                    tracing::warn!(url = %url, "cannot resolve the upstream's host, keeping its members: {e}");
                }
                next.extend(old.iter().filter(|m| m.origin == origin).cloned());
                continue;
            }
        };
        for ip in ips {
            let mut member_url = url.clone();
            if member_url.set_ip_host(ip).is_err() {
                continue;
            }
            let base = base_url(member_url.as_str());
            if next.iter().any(|m| m.base == base) {
                continue;
            }
            match by_base.get(base.as_str()) {
                Some(m) => next.push(Arc::clone(m)),
                None => {
                    tracing::info!(upstream = %base, from = %url, "upstream discovered");
                    // Probed right after discovery before it is preferred.
                    next.push(Member::new(base, origin, false));
                }
            }
        }
    }
    for m in old
        .iter()
        .filter(|m| !next.iter().any(|n| n.base == m.base))
    {
        tracing::info!(upstream = %m.base, "upstream no longer resolves: removed");
    }
    let changed =
        next.len() != old.len() || next.iter().zip(old.iter()).any(|(a, b)| !Arc::ptr_eq(a, b));
    if changed {
        members.replace(next);
    }
}

/// Probes every member's `/health` forever, ejecting and readmitting them and noting the
/// adapters of `model` each holds; with DNS discovery (`urls` not empty), resolves the members
/// again before each round.
pub(super) async fn probe(
    client: reqwest::Client,
    members: Arc<MemberSet>,
    urls: Vec<reqwest::Url>,
    api_key: Option<String>,
    model: String,
) {
    let mut failing = vec![false; urls.len()];
    loop {
        if !urls.is_empty() {
            discover(&members, &urls, &mut failing, lookup).await;
        }
        for m in members.current().iter() {
            let mut req = client
                .get(format!("{}/health", m.base))
                .timeout(PROBE_TIMEOUT);
            if let Some(k) = &api_key {
                req = req.bearer_auth(k);
            }
            let answer = match req.send().await {
                Ok(r) if r.status().is_success() => Some(r.json::<Value>().await.ok()),
                _ => None,
            };
            let ok = answer.is_some();
            if let Some(health) = answer {
                m.set_adapters(
                    health
                        .map(|h| super::adapters::listed(&h, &model))
                        .unwrap_or_default(),
                );
            }
            let was = m.healthy.swap(ok, Ordering::Relaxed);
            if was != ok {
                if ok {
                    tracing::info!(upstream = %m.base, "upstream healthy again: readmitted");
                } else {
                    tracing::warn!(upstream = %m.base, "upstream failed its health check: ejected");
                }
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
