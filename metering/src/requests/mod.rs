//! Request state kept in the ledger's database that is not money: stored Responses API objects
//! ([`responses`], migration 0010) and Idempotency-Key claims with their leases and replayable
//! answers ([`idempotency`], migration 0011). They share the store's connection, transactions
//! and migration sequence, and nothing in billing, limits or the ledger imports them
//! (`docs/notes/store-split.md` says why they are modules here rather than a crate of their
//! own). The ledger's half of "one charge per Idempotency-Key" (the unique index on charged
//! records, a second charge recorded `superseded`) is money and stays with the ledger.

pub mod idempotency;
pub mod responses;
