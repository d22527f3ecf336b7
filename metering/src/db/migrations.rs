//! The schema's migrations, from one source where the dialects agree: `migrations/shared`
//! holds the files SQLite and PostgreSQL run alike, `migrations/sqlite` and
//! `migrations/postgres` the ones written for one dialect (a version the other lacks, or SQL
//! that differs). A version lives either in `shared` or in the dialect directories, never in
//! both: loading refuses a duplicate rather than guess which one is meant.
//!
//! sqlx records each applied migration's version, description (from the file name) and
//! SHA-384 of its SQL in `_sqlx_migrations` and refuses to start on a database whose record
//! disagrees, so a file moved between these directories keeps its name and every byte.
//! `metering/tests/migrations.rs` opens databases left by the code from before `shared`
//! existed.

use std::future::Future;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, Migrator};
use sqlx::AnyPool;

use super::DbKind;

static SHARED: Migrator = sqlx::migrate!("migrations/shared");
static SQLITE: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("migrations/postgres");

/// One dialect's migrations, in version order: the shared ones and its own.
fn migrations(kind: DbKind) -> Result<Vec<Migration>, String> {
    let own = match kind {
        DbKind::Sqlite => &SQLITE,
        DbKind::Postgres => &POSTGRES,
    };
    let mut all: Vec<Migration> = SHARED.iter().chain(own.iter()).cloned().collect();
    all.sort_by_key(|m| m.version);
    if let Some(pair) = all.windows(2).find(|w| w[0].version == w[1].version) {
        return Err(format!(
            "migration {} is both in migrations/shared and among the {kind:?} ones",
            pair[0].version
        ));
    }
    Ok(all)
}

/// Applies the migrations `pool`'s database has not had yet.
pub(super) async fn run(pool: &AnyPool, kind: DbKind) -> Result<(), MigrateError> {
    Migrator::new(Dialect(kind)).await?.run(pool).await
}

/// [`migrations`] as sqlx's source of migrations.
#[derive(Debug)]
struct Dialect(DbKind);

impl MigrationSource<'static> for Dialect {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async move { migrations(self.0).map_err(BoxDynError::from) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every version once per dialect, and the 20 files the dialects share are in one place.
    #[test]
    fn each_dialect_has_every_version_once() {
        let versions = |kind| -> Vec<i64> {
            migrations(kind)
                .unwrap()
                .iter()
                .map(|m| m.version)
                .collect()
        };
        assert_eq!(
            versions(DbKind::Sqlite),
            [
                1, 3, 4, 5, 10, 11, 12, 20, 21, 22, 23, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
                41, 42
            ]
        );
        assert_eq!(
            versions(DbKind::Postgres),
            [
                1, 2, 3, 4, 5, 10, 11, 12, 20, 21, 22, 23, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39,
                40, 41, 42
            ]
        );
        assert_eq!(SHARED.iter().count(), 20);
    }

    /// A dialect file never repeats a shared one: the same SQL belongs in `shared`.
    #[test]
    fn no_dialect_file_repeats_a_shared_one() {
        for own in [&SQLITE, &POSTGRES] {
            for m in own.iter() {
                assert!(
                    SHARED.iter().all(|s| s.checksum != m.checksum),
                    "migration {} ({}) is the same SQL as a shared one",
                    m.version,
                    m.description
                );
            }
        }
        let same: Vec<i64> = SQLITE
            .iter()
            .filter(|s| {
                POSTGRES
                    .iter()
                    .any(|p| p.version == s.version && p.checksum == s.checksum)
            })
            .map(|m| m.version)
            .collect();
        assert!(same.is_empty(), "identical in both dialects: {same:?}");
    }
}
