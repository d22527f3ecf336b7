//! The `files` table's contract, on SQLite (`store.rs`) and PostgreSQL (`store_postgres.rs`):
//! ownership, the quota, pages, expiry and deletion.

#![allow(
    dead_code,
    reason = "the SQLite and the PostgreSQL test crates include this module; not every helper is used by both"
)]

use tollgate_metering::store::{FileQuery, FileRow, ListOrder, OverQuota, Store};

fn file(id: &str, customer: &str, bytes: i64, created_at: i64, expires_at: Option<i64>) -> FileRow {
    FileRow {
        id: id.into(),
        customer_id: customer.into(),
        filename: format!("{id}.jsonl"),
        purpose: if id.ends_with('x') { "other" } else { "batch" }.into(),
        bytes,
        lines: 3,
        created_at,
        expires_at,
    }
}

fn page<'a>(
    customer: &'a str,
    now: i64,
    after: Option<&'a str>,
    order: ListOrder,
) -> FileQuery<'a> {
    FileQuery {
        customer_id: customer,
        now,
        purpose: None,
        after,
        limit: 2,
        order,
    }
}

fn ids(files: &[FileRow]) -> Vec<&str> {
    files.iter().map(|f| f.id.as_str()).collect()
}

pub async fn exercise(store: &Store) {
    // The quota counts the customer's unexpired files only: acme has 100 bytes once file-0
    // has expired.
    for f in [
        file("file-0", "acme", 50, 10, Some(50)),
        file("file-1", "acme", 40, 100, Some(1_000)),
        file("file-2", "acme", 30, 101, None),
        file("file-3x", "acme", 30, 102, Some(1_000)),
        file("file-4", "beta", 90, 103, None),
    ] {
        assert_eq!(
            store.insert_file(&f, 100).await.unwrap(),
            Ok(()),
            "{}",
            f.id
        );
    }
    assert_eq!(store.file_bytes_used("acme", 200).await.unwrap(), 100);
    assert_eq!(store.file_bytes_used("nobody", 200).await.unwrap(), 0);
    let refused = store
        .insert_file(&file("file-5", "acme", 1, 200, None), 100)
        .await
        .unwrap();
    assert_eq!(refused, Err(OverQuota { used: 100 }));
    assert_eq!(store.file("file-5", "acme", 200).await.unwrap(), None);

    // Owned: another customer's id is not found, nor an expired one.
    let got = store.file("file-1", "acme", 200).await.unwrap().unwrap();
    assert_eq!(got, file("file-1", "acme", 40, 100, Some(1_000)));
    assert_eq!(store.file("file-1", "beta", 200).await.unwrap(), None);
    assert_eq!(store.file("file-0", "acme", 200).await.unwrap(), None);

    // Pages, both orders, by purpose.
    let (first, more) = store
        .files(&page("acme", 200, None, ListOrder::Desc))
        .await
        .unwrap();
    assert_eq!((ids(&first), more), (vec!["file-3x", "file-2"], true));
    let (next, more) = store
        .files(&page("acme", 200, Some("file-2"), ListOrder::Desc))
        .await
        .unwrap();
    assert_eq!((ids(&next), more), (vec!["file-1"], false));
    let (asc, more) = store
        .files(&page("acme", 200, None, ListOrder::Asc))
        .await
        .unwrap();
    assert_eq!((ids(&asc), more), (vec!["file-1", "file-2"], true));
    let batch = FileQuery {
        purpose: Some("batch"),
        limit: 10,
        ..page("acme", 200, None, ListOrder::Asc)
    };
    let (only, _) = store.files(&batch).await.unwrap();
    assert_eq!(ids(&only), vec!["file-1", "file-2"]);

    // Expiry: the sweep's list, then the rows forgotten.
    assert_eq!(store.expired_files(200, 10).await.unwrap(), vec!["file-0"]);
    assert_eq!(
        store.expired_files(1_000, 10).await.unwrap(),
        vec!["file-0", "file-1", "file-3x"]
    );
    store.forget_file("file-0").await.unwrap();
    assert_eq!(
        store.expired_files(200, 10).await.unwrap(),
        Vec::<String>::new()
    );

    // Deleting: only the owner's, once; the quota frees up.
    assert!(!store.delete_file("file-2", "beta").await.unwrap());
    assert!(store.delete_file("file-2", "acme").await.unwrap());
    assert!(!store.delete_file("file-2", "acme").await.unwrap());
    assert_eq!(store.file_bytes_used("acme", 200).await.unwrap(), 70);
    assert_eq!(
        store
            .insert_file(&file("file-5", "acme", 30, 200, None), 100)
            .await
            .unwrap(),
        Ok(())
    );
}
