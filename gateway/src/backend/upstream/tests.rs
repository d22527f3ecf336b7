use std::net::IpAddr;

use super::chat::{prompt_bound, settled_usage, UpstreamUsage};
use super::health::discover;
use super::*;
use crate::backend::{Prompt, UsageSource};

/// A customer-routed pool over `n` members that nothing probes.
fn routed_pool(n: usize) -> UpstreamPool {
    let info = ModelInfo {
        id: "m".into(),
        context_length: 4096,
        created: 0,
        owned_by: "tests".into(),
    };
    let urls: Vec<String> = (0..n).map(|i| format!("http://10.0.0.{i}:8000")).collect();
    let pool = UpstreamPool::new(info, "m".into(), &urls, None, Discovery::Static)
        .unwrap()
        .with_routing(Routing::Customer);
    pool.prober.abort();
    pool
}

fn first(pool: &UpstreamPool, customer: &str) -> String {
    pool.candidates(Some(customer), None)[0].base.clone()
}

#[tokio::test]
async fn customers_keep_their_member_until_it_is_loaded_or_gone() {
    let pool = routed_pool(3);
    let customers: Vec<String> = (0..300).map(|i| format!("cus_{i}")).collect();
    let home: Vec<String> = customers.iter().map(|c| first(&pool, c)).collect();
    // The same member every time, whatever the rotation; the customers spread over all.
    for (c, h) in customers.iter().zip(&home).take(20) {
        for _ in 0..4 {
            assert_eq!(&first(&pool, c), h);
        }
    }
    let members = pool.members.current();
    for m in members.iter() {
        let share = home.iter().filter(|h| **h == m.base).count();
        assert!((60..=140).contains(&share), "{}: {share} of 300", m.base);
    }
    // A member takes up to 4 requests, and beyond that up to 1.25x the average (the new
    // request counted); then the customer spills to the next member in its order.
    let c = &customers[0];
    let own = members.iter().find(|m| m.base == home[0]).unwrap();
    let others: Vec<_> = members.iter().filter(|m| m.base != home[0]).collect();
    own.in_flight.store(3, Ordering::Relaxed);
    assert_eq!(first(&pool, c), home[0]);
    own.in_flight.store(4, Ordering::Relaxed);
    assert_ne!(first(&pool, c), home[0]);
    others
        .iter()
        .for_each(|m| m.in_flight.store(10, Ordering::Relaxed));
    own.in_flight.store(14, Ordering::Relaxed); // bound ceil(35 / 3 * 1.25) = 15
    assert_eq!(first(&pool, c), home[0]);
    own.in_flight.store(15, Ordering::Relaxed); // bound ceil(36 / 3 * 1.25) = 15
    let spill = first(&pool, c);
    assert_ne!(spill, home[0]);
    // It spills to the next member in its own order, not to whichever is least busy.
    others
        .iter()
        .find(|m| m.base != spill)
        .unwrap()
        .in_flight
        .store(0, Ordering::Relaxed);
    assert_eq!(first(&pool, c), spill);
    members
        .iter()
        .for_each(|m| m.in_flight.store(0, Ordering::Relaxed));
    // Ejected: the next member in the customer's order; back: home again.
    own.healthy.store(false, Ordering::Relaxed);
    assert_ne!(first(&pool, c), home[0]);
    assert_eq!(pool.candidates(Some(c), None).last().unwrap().base, home[0]);
    own.healthy.store(true, Ordering::Relaxed);
    assert_eq!(first(&pool, c), home[0]);
    // A member that leaves moves only its own customers.
    let gone = members[1].base.clone();
    pool.members
        .replace(members.iter().filter(|m| m.base != gone).cloned().collect());
    for (c, h) in customers.iter().zip(&home) {
        if *h != gone {
            assert_eq!(&first(&pool, c), h, "{c} moved");
        }
    }
    // Without a customer: the least busy member.
    let members = pool.members.current();
    members[0].in_flight.store(3, Ordering::Relaxed);
    assert_eq!(pool.candidates(None, None)[0].base, members[1].base);
}

#[test]
fn base_urls_lose_their_v1() {
    assert_eq!(base_url("http://w1:8081/v1/"), "http://w1:8081");
    assert_eq!(base_url("http://w1:8081"), "http://w1:8081");
}

#[tokio::test]
async fn dns_discovery_tracks_the_addresses_and_keeps_known_members() {
    let set = MemberSet::default();
    let urls = [reqwest::Url::parse("http://workers.ns:8081").unwrap()];
    let mut failing = [false];
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let bases =
        |set: &MemberSet| -> Vec<String> { set.current().iter().map(|m| m.base.clone()).collect() };
    discover(&set, &urls, &mut failing, |host, port| async move {
        assert_eq!((host.as_str(), port), ("workers.ns", 8081));
        Ok(vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.1")])
    })
    .await;
    assert_eq!(
        bases(&set),
        ["http://10.0.0.1:8081", "http://10.0.0.2:8081"]
    );
    assert!(set
        .current()
        .iter()
        .all(|m| !m.healthy.load(Ordering::Relaxed)));
    let kept = set.current()[1].clone();
    kept.in_flight.store(3, Ordering::Relaxed);

    // A pod went away, another came: the one still there is the same member.
    discover(&set, &urls, &mut failing, |_, _| async {
        Ok(vec![ip("10.0.0.2"), ip("fd00::3")])
    })
    .await;
    assert_eq!(
        bases(&set),
        ["http://10.0.0.2:8081", "http://[fd00::3]:8081"]
    );
    assert!(Arc::ptr_eq(&set.current()[0], &kept));

    // A failed lookup keeps what was there; an empty answer leaves no member.
    discover(&set, &urls, &mut failing, |_, _| async {
        Err(std::io::Error::other("no DNS"))
    })
    .await;
    assert_eq!(set.current().len(), 2);
    assert_eq!(failing, [true]);
    discover(&set, &urls, &mut failing, |_, _| async { Ok(Vec::new()) }).await;
    assert!(set.current().is_empty());
    assert_eq!(failing, [false]);
}

#[test]
fn upstream_usage_never_bills_fewer_output_tokens_than_were_seen() {
    // 7 content chunks streamed by; the prompt was estimated at 40 tokens.
    let seen = 7;
    let settle =
        |u: Option<Value>| settled_usage(u.as_ref().and_then(UpstreamUsage::read), 40, seen);
    // No `usage` at all: the observed count and the prompt estimate.
    let u = settle(None);
    assert_eq!(
        (
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            u.source
        ),
        (40, 7, 0, UsageSource::Observed)
    );
    // `completion_tokens: null` and `0`: replaced by what was seen.
    for bad in [json!(null), json!(0), json!("12"), json!(3)] {
        let u = settle(Some(json!({"prompt_tokens": 12, "completion_tokens": bad})));
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.source),
            (12, 7, UsageSource::Observed),
            "completion_tokens {bad}"
        );
    }
    // A figure at least the observed one is the upstream's (chunks may hold several
    // tokens), with its cached prompt tokens.
    let u = settle(Some(json!({
        "prompt_tokens": 12, "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 8},
    })));
    assert_eq!(
        (
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            u.source
        ),
        (12, 9, 8, UsageSource::Upstream)
    );
    // Cached tokens are never more than the prompt.
    let u = settle(Some(json!({
        "prompt_tokens": 5, "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 50},
    })));
    assert_eq!(u.cached_tokens, 5);
}

#[test]
fn prompt_bound_is_at_least_the_bytes() {
    let p = Prompt::Text("héllo".into());
    assert!(prompt_bound(&p) >= 6);
}

/// A prediction is refused (400 naming it) by a pool whose upstreams are not said to accept
/// it, and prepared for one whose are.
#[tokio::test]
async fn a_prediction_is_refused_unless_the_upstream_takes_it() {
    let request = GenerateRequest {
        request_id: "r".into(),
        model: "m".into(),
        prompt: Prompt::Chat(vec![crate::backend::ChatMessage::new("user", "hi")]),
        params: Default::default(),
        response_format: Default::default(),
        tools: None,
        customer: None,
        scheduling_weight: None,
        service_tier: crate::backend::ServiceTier::Default,
        max_queue_wait: None,
        prediction: Some("hello".into()),
        adapter: None,
    };
    let refused = routed_pool(1).prepare(request.clone()).await.err();
    assert!(
        matches!(&refused, Some(BackendError::InvalidRequest { param: Some(p), .. }) if p == "prediction"),
        "{refused:?}"
    );
    let pool = routed_pool(1).with_forwarded_prediction(true);
    assert!(pool.prepare(request).await.is_ok());
}

#[tokio::test]
async fn an_adapters_requests_prefer_the_members_that_hold_it() {
    use std::collections::HashSet;
    let key = "path:0123456789abcdef";
    let held = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<HashSet<_>>();
    for routing in [Routing::LeastBusy, Routing::Customer] {
        let pool = routed_pool(3).with_routing(routing);
        let members = pool.members.current();
        let pick = |customer: Option<&str>| pool.candidates(customer, Some(key))[0].base.clone();
        let usual = |customer: Option<&str>| pool.candidates(customer, None)[0].base.clone();
        let idle = || {
            members
                .iter()
                .for_each(|m| m.in_flight.store(0, Ordering::Relaxed))
        };
        // Distinct loads, so that the usual order does not rotate between calls.
        for (i, m) in members.iter().enumerate() {
            m.in_flight.store(i as u32 + 1, Ordering::Relaxed);
        }
        // Nobody holds it: the usual order.
        assert_eq!(pick(Some("cus_1")), usual(Some("cus_1")));
        assert_eq!(pick(None), usual(None));
        // One holds it: first for every customer, whatever their own member.
        let holder = members
            .iter()
            .find(|m| m.base != usual(Some("cus_1")))
            .unwrap();
        holder.set_adapters(held(&[key, "name:other"]));
        for c in ["cus_1", "cus_2", "cus_3"] {
            assert_eq!(pick(Some(c)), holder.base, "{routing:?} {c}");
        }
        assert_eq!(pick(None), holder.base);
        // The others follow in the usual order.
        let rest: Vec<String> = pool
            .candidates(Some("cus_1"), Some(key))
            .iter()
            .skip(1)
            .map(|m| m.base.clone())
            .collect();
        let usual_rest: Vec<String> = pool
            .candidates(Some("cus_1"), None)
            .iter()
            .filter(|m| m.base != holder.base)
            .map(|m| m.base.clone())
            .collect();
        assert_eq!(rest, usual_rest);
        // At the load bound (4 requests with the others idle): no longer preferred.
        idle();
        holder.in_flight.store(3, Ordering::Relaxed);
        assert_eq!(pick(Some("cus_1")), holder.base);
        holder.in_flight.store(4, Ordering::Relaxed);
        assert_ne!(pick(Some("cus_1")), holder.base);
        holder.in_flight.store(0, Ordering::Relaxed);
        // Ejected: not preferred; back: preferred again.
        holder.healthy.store(false, Ordering::Relaxed);
        assert_ne!(pick(None), holder.base);
        holder.healthy.store(true, Ordering::Relaxed);
        assert_eq!(pick(None), holder.base);
        // Two hold it: the less busy of them (without a customer).
        let second = members.iter().find(|m| m.base != holder.base).unwrap();
        second.note_adapter(key);
        holder.in_flight.store(2, Ordering::Relaxed);
        assert_eq!(pick(None), second.base);
        // Its `/health` no longer lists it (unloaded): not preferred.
        second.set_adapters(HashSet::new());
        assert_eq!(pick(None), holder.base);
    }
}

#[test]
fn a_workers_health_lists_the_adapters_of_its_model() {
    let health = serde_json::json!({"status": "ok", "models": [
        {"id": "m", "running": 0, "adapters": ["path:1", "name:a"]},
        {"id": "m:a", "running": 0},
        {"id": "other", "adapters": ["path:2"]},
    ]});
    let listed = super::adapters::listed(&health, "m");
    assert_eq!(listed.len(), 2);
    assert!(listed.contains("path:1") && listed.contains("name:a"));
    assert!(super::adapters::listed(&serde_json::json!("ok"), "m").is_empty());
}

#[test]
fn adapters_reach_workers_as_headers_and_back() {
    use crate::backend::AdapterRef;
    let to_map = |headers: Vec<(&'static str, String)>| {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.insert(name, value.parse().unwrap());
        }
        map
    };
    let plain = AdapterRef {
        name: "pirate".into(),
        path: Some("/srv/adapters/acme/pirate v2".into()),
    };
    let named = AdapterRef {
        name: "noisy".into(),
        path: None,
    };
    for a in [plain, named] {
        let back = forwarded_adapter(&to_map(super::adapters::headers(&a))).unwrap();
        assert_eq!(back, Some(a));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let odd = AdapterRef {
            name: "odd".into(),
            path: Some(std::ffi::OsStr::from_bytes(b"/srv/\xff\xfe").into()),
        };
        let back = forwarded_adapter(&to_map(super::adapters::headers(&odd))).unwrap();
        assert_eq!(back, Some(odd));
    }
    assert_eq!(forwarded_adapter(&http::HeaderMap::new()), Ok(None));
    let bad = |pairs: &[(&'static str, &str)]| {
        forwarded_adapter(&to_map(
            pairs.iter().map(|(n, v)| (*n, v.to_string())).collect(),
        ))
    };
    assert_eq!(bad(&[(ADAPTER_HEADER, "a:b")]), Err(ADAPTER_HEADER));
    assert_eq!(bad(&[(ADAPTER_PATH_HEADER, "L3Q")]), Err(ADAPTER_HEADER));
    // Not base64, and a relative path ("rel").
    assert_eq!(
        bad(&[(ADAPTER_HEADER, "a"), (ADAPTER_PATH_HEADER, "*")]),
        Err(ADAPTER_PATH_HEADER)
    );
    assert_eq!(
        bad(&[(ADAPTER_HEADER, "a"), (ADAPTER_PATH_HEADER, "cmVs")]),
        Err(ADAPTER_PATH_HEADER)
    );
}
