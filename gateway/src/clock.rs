//! Time the tests control: the one [`Clock`] of the workspace, kept in metering (budgets read
//! it there) and used here by the key cache. See `tollgate_metering::clock`.

pub use tollgate_metering::clock::Clock;
