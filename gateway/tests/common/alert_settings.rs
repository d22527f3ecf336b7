//! The alert settings the admin API and the CLI write through the store, on SQLite (`store.rs`) and
//! PostgreSQL (`store_postgres.rs`): a webhook gets a secret, thresholds are kept. The alerts
//! they then make are the store's contract (`metering/tests/common/store_contract.rs`).

use tollgate_metering::alerts::{self, SettingsChange};
use tollgate_metering::audit::Actor;
use tollgate_metering::store::{CustomerFields, Store};

pub async fn issue_a_secret_and_keep_the_thresholds(store: &Store) {
    let fields = CustomerFields {
        budget_nano_usd: Some(Some(1_000)),
        ..CustomerFields::default()
    };
    store
        .create_customer("alerted", fields, &Actor::cli("contract"))
        .await
        .unwrap();
    let change = SettingsChange {
        webhook_url: Some(Some("http://127.0.0.1:9/hook".into())),
        thresholds: Some(vec!["0.5".into(), "0.9".into()]),
        rotate_secret: false,
    };
    let (settings, secret) =
        alerts::update_settings(store, "alerted", change, &Actor::cli("contract"))
            .await
            .unwrap();
    assert!(secret.unwrap().starts_with("whsec_"));
    assert_eq!(settings.thresholds, ["0.5", "0.9"]);
}
