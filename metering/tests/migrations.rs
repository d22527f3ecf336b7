//! Databases migrated before the migrations both dialects share moved to `migrations/shared`
//! open unchanged: sqlx refuses a database whose recorded migration (version, SHA-384 of its
//! SQL) the code disagrees with, so moving a file must keep every byte. The fixtures are
//! dumps of databases the earlier code migrated (`tests/fixtures/`); the PostgreSQL case is
//! built with the `postgres-tests` feature and `TOLLGATE_TEST_POSTGRES_URL`, as in
//! `store_postgres.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use sqlx::{AnyConnection, Connection, Row};
use tollgate_metering::audit::Actor;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::store::{CustomerFields, Store, StoreError};

const SQLITE_BEFORE: &str = include_str!("fixtures/before_shared_migrations.sqlite.sql");
#[cfg(feature = "postgres-tests")]
const POSTGRES_BEFORE: &str = include_str!("fixtures/before_shared_migrations.postgres.sql");

/// What `_sqlx_migrations` records: version, description, checksum, success.
type Applied = Vec<(i64, String, Vec<u8>, bool)>;

async fn connect(url: &str) -> AnyConnection {
    sqlx::any::install_default_drivers();
    AnyConnection::connect(url).await.unwrap()
}

/// Runs a dump on an empty database.
async fn load(url: &str, dump: &str) {
    let mut conn = connect(url).await;
    sqlx::raw_sql(dump).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

async fn applied(url: &str) -> Applied {
    let mut conn = connect(url).await;
    let rows = sqlx::query(
        "SELECT version, description, checksum, \
         CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT) AS success \
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    rows.iter()
        .map(|r| {
            let success = r.get::<i64, _>("success") == 1;
            (
                r.get("version"),
                r.get("description"),
                r.get("checksum"),
                success,
            )
        })
        .collect()
}

/// `old` holds the fixture's database, `fresh` is empty: the code opens the old one without
/// applying or changing anything, finds its data, and records the same migrations on the
/// fresh one as the earlier code did on the old.
async fn opens_unchanged(old: &str, fresh: &str, versions: usize) {
    let before = applied(old).await;
    assert_eq!(before.len(), versions);
    // A record written before tiers existed (no `service_tier` column yet).
    let mut conn = connect(old).await;
    sqlx::query(
        "INSERT INTO usage_records (id, customer_id, key_id, model, endpoint, stream, status, \
         input_tokens, output_tokens, started_at, finished_at, input_price_per_mtok, \
         output_price_per_mtok, cost_nano_usd) \
         VALUES ('old-1', 'acme', 'key_old', 'm', '/v1/chat/completions', 0, 'completed', \
         3, 4, 10, 20, '0.1', '0.2', 5)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let store = Store::connect(old).await.unwrap();
    let (records, _) = store.records_after(0, 10).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].id.as_str(), records[0].service_tier),
        ("old-1", ServiceTier::Default),
        "a record from before tiers reads back as served at `default`"
    );
    assert_eq!(
        records[0].prediction,
        Default::default(),
        "a record from before predictions reads back with none"
    );
    let acme = store.customer("acme").await.unwrap();
    assert_eq!(
        (acme.name.as_str(), acme.budget_nano_usd),
        ("Acme", Some(25_000_000_000))
    );
    store
        .create_customer("beta", CustomerFields::default(), &Actor::system())
        .await
        .unwrap();
    store.close().await;
    let after = applied(old).await;
    assert_eq!(after[..before.len()], before, "nothing applied again");
    let added: Vec<i64> = after[before.len()..].iter().map(|m| m.0).collect();
    assert_eq!(
        added, SINCE_FIXTURES,
        "only the migrations newer than the fixture"
    );

    Store::connect(fresh).await.unwrap().close().await;
    assert_eq!(
        applied(fresh).await,
        after,
        "the same versions, descriptions and checksums"
    );
}

/// The migrations written after the fixtures were taken: applied to an old database on open.
const SINCE_FIXTURES: [i64; 12] = [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42];

/// The same check has teeth: a database that recorded another checksum for a shared
/// migration is refused.
async fn refuses_another_checksum(old: &str) {
    let mut conn = connect(old).await;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 11")
        .bind(vec![0u8; 48])
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    match Store::connect(old).await {
        Err(StoreError::Migrate(sqlx::migrate::MigrateError::VersionMismatch(11))) => {}
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a database with another checksum for migration 11 was opened"),
    }
}

fn sqlite_url(dir: &tempfile::TempDir, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", dir.path().join(name).display())
}

#[tokio::test]
async fn a_sqlite_database_migrated_before_shared_migrations_opens_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let old = sqlite_url(&dir, "old.db");
    load(&old, SQLITE_BEFORE).await;
    opens_unchanged(&old, &sqlite_url(&dir, "fresh.db"), 12).await;
    refuses_another_checksum(&old).await;
}

#[cfg(feature = "postgres-tests")]
#[tokio::test]
async fn a_postgres_database_migrated_before_shared_migrations_opens_unchanged() {
    let url = std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .expect("TOLLGATE_TEST_POSTGRES_URL must name an empty PostgreSQL database");
    let (base, _) = url
        .rsplit_once('/')
        .expect("URL ends with the database name");
    let mut admin = connect(&url).await;
    for name in ["tollgate_before_shared", "tollgate_after_shared"] {
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::raw_sql(&sql).execute(&mut admin).await.unwrap();
        }
    }
    admin.close().await.unwrap();
    let old = format!("{base}/tollgate_before_shared");
    load(&old, POSTGRES_BEFORE).await;
    opens_unchanged(&old, &format!("{base}/tollgate_after_shared"), 13).await;
    refuses_another_checksum(&old).await;
}
