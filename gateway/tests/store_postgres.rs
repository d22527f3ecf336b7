//! The store contract on a real PostgreSQL server. Built only with the `postgres-tests`
//! feature; `scripts/test.sh` starts a throwaway server (scripts/postgres.sh) and runs
//! `cargo test -p tollgate-gateway --features postgres-tests --test store_postgres` with
//! `TOLLGATE_TEST_POSTGRES_URL` naming its empty database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tollgate_gateway::store::Store;

#[path = "common/store_contract.rs"]
mod contract;

#[tokio::test]
async fn postgres_store_contract() {
    let url = std::env::var("TOLLGATE_TEST_POSTGRES_URL")
        .expect("TOLLGATE_TEST_POSTGRES_URL must name an empty PostgreSQL database");
    let store = Store::connect(&url).await.unwrap();
    contract::exercise(&store).await;
}
