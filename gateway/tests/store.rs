//! What the gateway keeps of a store on SQLite: its key cache (lookups reused briefly,
//! revocations seen within `KEY_MAX_AGE`) and the alert settings it writes (PostgreSQL:
//! `store_postgres.rs`). The store's own contract is tested next to it
//! (`metering/tests/store.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::time::Duration;

use tollgate_metering::store::Store;

#[path = "common/alert_settings.rs"]
mod alert_settings;

async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(dir.path().join("ledger.db").to_str().unwrap())
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn sqlite_alert_settings() {
    let (_dir, store) = sqlite().await;
    alert_settings::issue_a_secret_and_keep_the_thresholds(&store).await;
}

/// A key's lookup is reused for `KEY_FRESH`, then served while a background lookup refreshes
/// it, and never past `KEY_MAX_AGE`: a revocation made elsewhere (another replica, the CLI) is
/// seen within that, one made through this process (`forget_key`) at once, and a change of the
/// customer's limits through this process (`forget_customer`) at once too.
#[tokio::test]
async fn key_lookups_are_reused_briefly_and_revocations_seen_within_key_max_age() {
    use tollgate_gateway::auth::{AuthConfig, KeyCache, KEY_FRESH, KEY_MAX_AGE};
    use tollgate_gateway::clock::Clock;
    use tollgate_metering::audit::Actor;
    use tollgate_metering::secrets::{digest, hex};
    use tollgate_metering::store::{CustomerFields, NewKey};
    let actor = Actor::system();

    let (_dir, store) = sqlite().await;
    store
        .create_customer("acme", CustomerFields::default(), &actor)
        .await
        .unwrap();
    // Time moves only when the test says so.
    let clock = Clock::manual();
    let auth = AuthConfig::default().with_key_cache(KeyCache {
        clock: clock.clone(),
        ..KeyCache::default()
    });
    for (id, secret) in [("key_a", "tg-a"), ("key_b", "tg-b"), ("key_c", "tg-c")] {
        store
            .create_key(
                "acme",
                id,
                &hex(&digest(secret)),
                "tg-",
                NewKey::default(),
                &actor,
            )
            .await
            .unwrap();
        assert_eq!(auth.resolve(Some(&store), secret).await.unwrap().key_id, id);
    }

    // Revoked behind this process's back: served from the lookup while it is fresh, then once
    // more while a background lookup runs, which then refuses it.
    store.revoke_key("key_a", &actor).await.unwrap();
    store.revoke_key("key_c", &actor).await.unwrap();
    clock.advance(KEY_FRESH - Duration::from_millis(1));
    assert!(
        auth.resolve(Some(&store), "tg-a").await.is_ok(),
        "lookup reused"
    );
    clock.advance(Duration::from_millis(1));
    assert!(
        auth.resolve(Some(&store), "tg-a").await.is_ok(),
        "stale, refreshing"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match auth.resolve(Some(&store), "tg-a").await {
            Err(e) => break e,
            Ok(_) => assert!(std::time::Instant::now() < deadline, "never refused"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(refused.to_string().contains("revoked"), "{refused}");
    // Past KEY_MAX_AGE a lookup is not served at all: the request waits for a new one (tg-c
    // was looked up before the clock moved, and not since).
    clock.advance(KEY_MAX_AGE - KEY_FRESH);
    let refused = auth.resolve(Some(&store), "tg-c").await.unwrap_err();
    assert!(refused.to_string().contains("revoked"), "{refused}");

    // A customer's limits changed through this process: the next request sees them.
    let fields = CustomerFields {
        rpm: Some(Some(7)),
        ..CustomerFields::default()
    };
    store.update_customer("acme", fields, &actor).await.unwrap();
    auth.forget_customer("acme");
    let caller = auth.resolve(Some(&store), "tg-b").await.unwrap();
    assert_eq!(caller.limits.customer_rpm, Some(7));

    // Revoked through this process: refused at once.
    store.revoke_key("key_b", &actor).await.unwrap();
    auth.forget_key("key_b");
    assert!(auth.resolve(Some(&store), "tg-b").await.is_err());
}
