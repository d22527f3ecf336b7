//! The `customer_adapters` table's contract, on SQLite (`store.rs`) and PostgreSQL
//! (`store_postgres.rs`): registered per customer under a unique name, listed, removed, each
//! change audited; and a usage record's base model and adapter read back as written.

use tollgate_metering::audit::Actor;
use tollgate_metering::store::{CustomerFields, Store, StoreError, UsageRecord};

pub async fn exercise(store: &Store) {
    let actor = Actor::cli("ops");
    for id in ["ad-a", "ad-b"] {
        store
            .create_customer(id, CustomerFields::default(), &actor)
            .await
            .unwrap();
    }
    let start = store.audit_after(0, 1000).await.unwrap().len();
    let a = store
        .add_adapter("ad-a", "pirate", "smol", "/srv/pirate", &actor)
        .await
        .unwrap();
    assert_eq!(a.model_id(), "smol:pirate");
    // Another customer may use the same name: names are per customer.
    store
        .add_adapter("ad-b", "pirate", "smol", "/srv/other", &actor)
        .await
        .unwrap();
    let again = store
        .add_adapter("ad-a", "pirate", "other-base", "/srv/x", &actor)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(m)) if m.contains("`pirate`")));
    let nobody = store
        .add_adapter("nobody", "x", "smol", "/srv/x", &actor)
        .await;
    assert!(matches!(nobody, Err(StoreError::NotFound(_))), "{nobody:?}");
    let bad = store
        .add_adapter("ad-a", "a:b", "smol", "/srv/x", &actor)
        .await;
    assert!(matches!(bad, Err(StoreError::Invalid(m)) if m.contains("a:b")));

    let mine = store.adapters(Some("ad-a")).await.unwrap();
    assert_eq!(mine, vec![a.clone()]);
    assert_eq!(store.adapters(None).await.unwrap().len(), 2);

    let removed = store
        .remove_adapter("ad-a", "pirate", &actor)
        .await
        .unwrap();
    assert_eq!(removed, a);
    assert!(store.adapters(Some("ad-a")).await.unwrap().is_empty());
    let twice = store.remove_adapter("ad-a", "pirate", &actor).await;
    assert!(matches!(twice, Err(StoreError::NotFound(_))), "{twice:?}");
    assert_eq!(store.adapters(Some("ad-b")).await.unwrap().len(), 1);

    let audit = store.audit_after(0, 1000).await.unwrap();
    let actions: Vec<(&str, &str)> = audit[start..]
        .iter()
        .map(|e| (e.action.as_str(), e.target_id.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("adapter.added", "ad-a/pirate"),
            ("adapter.added", "ad-b/pirate"),
            ("adapter.removed", "ad-a/pirate"),
        ]
    );
    assert_eq!(audit[start].changes["path"], "/srv/pirate");
    assert_eq!(audit[start].changes["base_model"], "smol");

    // The record of a request to an adapter's model id keeps its base model and adapter.
    let record = UsageRecord {
        id: "ad-rec-1".into(),
        customer_id: "ad-a".into(),
        key_id: "key_ad".into(),
        model: "smol:pirate".into(),
        base_model: Some("smol".into()),
        adapter: Some("pirate".into()),
        ..UsageRecord::default()
    };
    let plain = UsageRecord {
        id: "ad-rec-2".into(),
        model: "smol".into(),
        ..record.clone()
    };
    let plain = UsageRecord {
        base_model: None,
        adapter: None,
        ..plain
    };
    store
        .insert_records(&[record.clone(), plain.clone()])
        .await
        .unwrap();
    let (back, _) = store.records_after(0, 100).await.unwrap();
    let find = |id: &str| back.iter().find(|r| r.id == id).unwrap().clone();
    assert_eq!(find("ad-rec-1"), record);
    assert_eq!(find("ad-rec-2"), plain);
}
