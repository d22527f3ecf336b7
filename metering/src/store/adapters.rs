//! Customers' LoRA adapters (`customer_adapters`): registered, listed, repriced and removed,
//! each change audited in its own transaction. An adapter's own price table is kept as given
//! (JSON), validated by the gateway before it is stored. Whether an adapter's files fit its
//! base model is checked before it is registered, by whoever can load them (the server, the
//! CLI); the store keeps the rule that a name is unique per customer and a valid id.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{is_unique_violation, now_micros, valid_id, Store, StoreError, StoreResult};
use crate::accounts::CustomerAdapter;
use crate::audit::{self, Action, Actor, Change};
use crate::money::PriceTable;
use crate::views::AdapterView;

const COLUMNS: &str = "customer_id, name, base_model, path, price, created_at";

fn adapter(row: &AnyRow) -> StoreResult<CustomerAdapter> {
    Ok(CustomerAdapter {
        customer_id: row.try_get("customer_id")?,
        name: row.try_get("name")?,
        base_model: row.try_get("base_model")?,
        path: row.try_get("path")?,
        price: row
            .try_get::<Option<String>, _>("price")?
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        created_at: row.try_get("created_at")?,
    })
}

/// `price` as the column holds it.
fn price_text(price: Option<&PriceTable>) -> StoreResult<Option<String>> {
    price
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Invalid(format!("price: {e}")))
}

/// The audit entry of `a` added or removed.
fn change(action: Action, a: &CustomerAdapter) -> Change {
    Change {
        action,
        target_id: format!("{}/{}", a.customer_id, a.name),
        changes: AdapterView::from(a).audited(),
    }
}

impl Store {
    /// Registers `customer_id`'s adapter `name` on `base_model` (its files at `path`, at
    /// `price` or the base model's): 404 for an unknown customer, 409 when the customer has an
    /// adapter of that name.
    pub async fn add_adapter(
        &self,
        customer_id: &str,
        name: &str,
        base_model: &str,
        path: &str,
        price: Option<PriceTable>,
        actor: &Actor,
    ) -> StoreResult<CustomerAdapter> {
        if !valid_id(name) {
            return Err(StoreError::Invalid(format!(
                "adapter name `{name}`: use 1-64 letters, digits, `-`, `_` and `.`"
            )));
        }
        self.customer(customer_id).await?;
        let a = CustomerAdapter {
            customer_id: customer_id.to_string(),
            name: name.to_string(),
            base_model: base_model.to_string(),
            path: path.to_string(),
            price,
            created_at: now_micros(),
        };
        let mut tx = self.write_tx().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO customer_adapters ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
        ))
        .bind(&a.customer_id)
        .bind(&a.name)
        .bind(&a.base_model)
        .bind(&a.path)
        .bind(price_text(a.price.as_ref())?)
        .bind(a.created_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "customer `{customer_id}` already has an adapter `{name}`"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        audit::record(
            &mut tx,
            self.kind(),
            actor,
            &change(Action::AdapterAdded, &a),
        )
        .await?;
        tx.commit().await?;
        Ok(a)
    }

    /// Adapters by customer and name: one customer's, or every customer's.
    pub async fn adapters(&self, customer_id: Option<&str>) -> StoreResult<Vec<CustomerAdapter>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM customer_adapters WHERE ($1 IS NULL OR customer_id = $1) \
             ORDER BY customer_id, name"
        ))
        .bind(customer_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(adapter).collect()
    }

    /// Removes `customer_id`'s adapter `name` (404 when it has none) and returns it.
    pub async fn remove_adapter(
        &self,
        customer_id: &str,
        name: &str,
        actor: &Actor,
    ) -> StoreResult<CustomerAdapter> {
        let mut tx = self.write_tx().await?;
        let a = one(&mut tx, customer_id, name).await?;
        sqlx::query("DELETE FROM customer_adapters WHERE customer_id = $1 AND name = $2")
            .bind(customer_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            self.kind(),
            actor,
            &change(Action::AdapterRemoved, &a),
        )
        .await?;
        tx.commit().await?;
        Ok(a)
    }

    /// Sets `customer_id`'s adapter `name`'s price (`None`: the base model's from now on) and
    /// returns the adapter (404 when the customer has none of that name). Audited as
    /// `adapter.updated` with the price before and after, when it changed.
    pub async fn set_adapter_price(
        &self,
        customer_id: &str,
        name: &str,
        price: Option<PriceTable>,
        actor: &Actor,
    ) -> StoreResult<CustomerAdapter> {
        let mut tx = self.write_tx().await?;
        let before = one(&mut tx, customer_id, name).await?;
        let after = CustomerAdapter {
            price,
            ..before.clone()
        };
        sqlx::query("UPDATE customer_adapters SET price = $1 WHERE customer_id = $2 AND name = $3")
            .bind(price_text(after.price.as_ref())?)
            .bind(customer_id)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let audited = |a: &CustomerAdapter| AdapterView::from(a).audited();
        if let Some(changes) = audit::diff(&audited(&before), &audited(&after)) {
            let change = Change {
                action: Action::AdapterUpdated,
                target_id: format!("{customer_id}/{name}"),
                changes,
            };
            audit::record(&mut tx, self.kind(), actor, &change).await?;
        }
        tx.commit().await?;
        Ok(after)
    }
}

/// `customer_id`'s adapter `name` inside `tx`, or 404.
async fn one(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    customer_id: &str,
    name: &str,
) -> StoreResult<CustomerAdapter> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM customer_adapters WHERE customer_id = $1 AND name = $2"
    ))
    .bind(customer_id)
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some(row) => adapter(&row),
        None => Err(StoreError::NotFound(format!(
            "customer `{customer_id}` has no adapter `{name}`"
        ))),
    }
}
