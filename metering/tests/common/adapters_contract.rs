//! The `customer_adapters` table's contract, on SQLite (`store.rs`) and PostgreSQL
//! (`store_postgres.rs`): registered per customer under a unique name (with a price table of
//! its own or none), listed, repriced, removed, each change audited; and a usage record's
//! base model and adapter read back as written, and on invoice lines.

use tollgate_metering::audit::Actor;
use tollgate_metering::billing;
use tollgate_metering::money::{PriceTable, TierPriceTable};
use tollgate_metering::store::{now_micros, CustomerFields, Store, StoreError, UsageRecord};

fn table(input: &str, output: &str) -> PriceTable {
    PriceTable {
        input_per_mtok: input.into(),
        output_per_mtok: output.into(),
        cached_input_per_mtok: None,
        rejected_prediction_per_mtok: None,
        flex: None,
        batch: None,
        priority: None,
        priority_multiplier: None,
        reserved_per_ktpm_month: None,
    }
}

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
        .add_adapter("ad-a", "pirate", "smol", "/srv/pirate", None, &actor)
        .await
        .unwrap();
    assert_eq!(a.model_id(), "smol:pirate");
    // Another customer may use the same name: names are per customer.
    store
        .add_adapter("ad-b", "pirate", "smol", "/srv/other", None, &actor)
        .await
        .unwrap();
    let again = store
        .add_adapter("ad-a", "pirate", "other-base", "/srv/x", None, &actor)
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(m)) if m.contains("`pirate`")));
    let nobody = store
        .add_adapter("nobody", "x", "smol", "/srv/x", None, &actor)
        .await;
    assert!(matches!(nobody, Err(StoreError::NotFound(_))), "{nobody:?}");
    let bad = store
        .add_adapter("ad-a", "a:b", "smol", "/srv/x", None, &actor)
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
    prices(store, &actor).await;
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
    invoice_lines(store).await;
}

/// An adapter's own price table is kept as given (per-tier prices too), repriced and put back
/// to the base model's (`None`), each change audited with the price before and after; a
/// change to the same price is not an entry.
async fn prices(store: &Store, actor: &Actor) {
    let own = PriceTable {
        flex: Some(TierPriceTable {
            input_per_mtok: "0.5".into(),
            output_per_mtok: "0.75".into(),
            cached_input_per_mtok: None,
            rejected_prediction_per_mtok: Some("0.1".into()),
        }),
        priority_multiplier: Some("2".into()),
        ..table("1.25", "2.5")
    };
    let a = store
        .add_adapter(
            "ad-a",
            "priced",
            "smol",
            "/srv/priced",
            Some(own.clone()),
            actor,
        )
        .await
        .unwrap();
    assert_eq!(a.price.as_ref(), Some(&own));
    let read = |store: &Store| {
        let store = store.clone();
        async move {
            let all = store.adapters(Some("ad-a")).await.unwrap();
            all.into_iter().find(|a| a.name == "priced").unwrap()
        }
    };
    assert_eq!(read(store).await, a);
    let start = store.audit_after(0, 1000).await.unwrap().len();
    let cheaper = table("0.1", "0.2");
    let after = store
        .set_adapter_price("ad-a", "priced", Some(cheaper.clone()), actor)
        .await
        .unwrap();
    assert_eq!(
        (after.price.as_ref(), after.created_at),
        (Some(&cheaper), a.created_at)
    );
    assert_eq!(read(store).await, after);
    store
        .set_adapter_price("ad-a", "priced", Some(cheaper.clone()), actor)
        .await
        .unwrap();
    let base = store
        .set_adapter_price("ad-a", "priced", None, actor)
        .await
        .unwrap();
    assert_eq!(read(store).await.price, None);
    assert_eq!(base.price, None);
    let missing = store
        .set_adapter_price("ad-a", "nothing", None, actor)
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
    let audit = store.audit_after(0, 1000).await.unwrap();
    let updates: Vec<_> = audit[start..].iter().collect();
    assert_eq!(updates.len(), 2, "{updates:?}");
    assert_eq!(updates[0].action.as_str(), "adapter.updated");
    assert_eq!(updates[0].target_id, "ad-a/priced");
    assert_eq!(
        updates[0].changes["price"]["from"]["input_per_mtok"],
        "1.25"
    );
    assert_eq!(
        updates[0].changes["price"]["from"]["flex"]["output_per_mtok"],
        "0.75"
    );
    assert_eq!(updates[0].changes["price"]["to"]["output_per_mtok"], "0.2");
    assert!(updates[1].changes["price"]["to"].is_null());
    store.remove_adapter("ad-a", "priced", actor).await.unwrap();
}

/// An invoice's lines of an adapter's model id name its base model and adapter; a model's
/// own lines have neither.
async fn invoice_lines(store: &Store) {
    let actor = Actor::cli("ops");
    store
        .create_customer("ad-inv", CustomerFields::default(), &actor)
        .await
        .unwrap();
    let at = now_micros();
    let record = |id: &str, model: &str, adapter: Option<&str>| UsageRecord {
        id: id.into(),
        customer_id: "ad-inv".into(),
        key_id: "key_inv".into(),
        model: model.into(),
        base_model: adapter.map(|_| "smol".into()),
        adapter: adapter.map(Into::into),
        input_tokens: 10,
        output_tokens: 5,
        cost_nano_usd: 7,
        started_at: at,
        ..UsageRecord::default()
    };
    let records = [
        record("inv-1", "smol:pirate", Some("pirate")),
        record("inv-2", "smol:pirate", Some("pirate")),
        record("inv-3", "smol", None),
    ];
    store.insert_records(&records).await.unwrap();
    let period = billing::current_period();
    let invoice = billing::invoice(store, "ad-inv", &period).await.unwrap();
    let lines: Vec<_> = invoice
        .line_items
        .iter()
        .map(|l| {
            (
                l.model.as_str(),
                l.base_model.as_deref(),
                l.adapter.as_deref(),
                l.requests,
            )
        })
        .collect();
    assert_eq!(
        lines,
        [
            ("smol", None, None, Some(1)),
            ("smol:pirate", Some("smol"), Some("pirate"), Some(2)),
        ]
    );
    let csv = invoice.csv().unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].ends_with("amount_usd,base_model,adapter"), "{csv}");
    assert!(
        rows[1].starts_with("tokens,smol,") && rows[1].ends_with(",,"),
        "{csv}"
    );
    assert!(rows[2].ends_with(",smol,pirate"), "{csv}");
}
