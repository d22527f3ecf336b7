//! Customers: who pays, with their budgets and limits. Every change is audited in its own
//! transaction (`crate::audit`).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    is_unique_violation, kind_column, now_micros, optional_kind_column, Store, StoreError,
    StoreResult,
};
use crate::accounts::Customer;
use crate::audit::{self, Action, Actor, Change};
use crate::kinds::{BudgetPeriod, ServiceTier};
use crate::views::CustomerView;

/// Ids are what operators and billing systems join on: short, printable, no spaces.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The largest scheduling weight (a customer weighted so gets 100 times the share of one
/// weighted 1).
pub const MAX_SCHEDULING_WEIGHT: i64 = 100;

/// Fields of a new or patched customer.
#[derive(Debug, Clone, Default)]
pub struct CustomerFields {
    pub name: Option<String>,
    /// `Some(None)` clears the budget.
    pub budget_nano_usd: Option<Option<i64>>,
    pub budget_period: Option<BudgetPeriod>,
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    /// `Some(None)` clears the cap.
    pub max_concurrent_requests: Option<Option<i64>>,
    /// 1 to [`MAX_SCHEDULING_WEIGHT`] (checked by the caller).
    pub scheduling_weight: Option<i64>,
    /// `Some(None)` clears it (requests asking `auto` get `default`).
    pub default_service_tier: Option<Option<ServiceTier>>,
    pub allow_priority: Option<bool>,
}

impl CustomerFields {
    /// `c` with these changes (each `None` leaves its field as it is).
    fn applied_to(self, c: &Customer) -> Customer {
        let Self {
            name,
            budget_nano_usd,
            budget_period,
            rpm,
            tpm,
            max_concurrent_requests,
            scheduling_weight,
            default_service_tier,
            allow_priority,
        } = self;
        Customer {
            id: c.id.clone(),
            name: name.unwrap_or_else(|| c.name.clone()),
            budget_nano_usd: budget_nano_usd.unwrap_or(c.budget_nano_usd),
            budget_period: budget_period.unwrap_or(c.budget_period),
            rpm: rpm.unwrap_or(c.rpm),
            tpm: tpm.unwrap_or(c.tpm),
            created_at: c.created_at,
            max_concurrent_requests: max_concurrent_requests.unwrap_or(c.max_concurrent_requests),
            scheduling_weight: scheduling_weight.unwrap_or(c.scheduling_weight),
            default_service_tier: default_service_tier.unwrap_or(c.default_service_tier),
            allow_priority: allow_priority.unwrap_or(c.allow_priority),
        }
    }
}

/// A customer's settings: every column but its id and creation time, in the order
/// [`bind_settings`] binds them.
const SETTINGS_COLUMNS: &str = "name, budget_nano_usd, budget_period, rpm, tpm, \
     max_concurrent_requests, scheduling_weight, default_service_tier, allow_priority";

/// `query` with `c`'s settings bound after the parameters it has ([`SETTINGS_COLUMNS`]).
fn bind_settings<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    c: &'q Customer,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(&c.name)
        .bind(c.budget_nano_usd)
        .bind(c.budget_period.as_str())
        .bind(c.rpm)
        .bind(c.tpm)
        .bind(c.max_concurrent_requests)
        .bind(c.scheduling_weight)
        .bind(c.default_service_tier.map(ServiceTier::as_str))
        .bind(i64::from(c.allow_priority))
}

const CUSTOMER_COLUMNS: &str =
    "id, name, budget_nano_usd, budget_period, rpm, tpm, created_at, max_concurrent_requests, \
     scheduling_weight, default_service_tier, allow_priority";

fn customer(row: &AnyRow) -> StoreResult<Customer> {
    Ok(Customer {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        budget_nano_usd: row.try_get("budget_nano_usd")?,
        budget_period: kind_column(row, "budget_period")?,
        rpm: row.try_get("rpm")?,
        tpm: row.try_get("tpm")?,
        created_at: row.try_get("created_at")?,
        max_concurrent_requests: row.try_get("max_concurrent_requests")?,
        scheduling_weight: row.try_get("scheduling_weight")?,
        default_service_tier: optional_kind_column(row, "default_service_tier")?,
        allow_priority: row.try_get::<i64, _>("allow_priority")? != 0,
    })
}

/// A customer's fields as the audit log shows them (money as decimal USD).
fn audited_customer(c: &Customer) -> serde_json::Value {
    CustomerView::from(c).audited()
}

impl Store {
    pub async fn create_customer(
        &self,
        id: &str,
        fields: CustomerFields,
        actor: &Actor,
    ) -> StoreResult<Customer> {
        // What a customer is given unless `fields` say otherwise: no budget or limits, the
        // id as its name, weight 1, the default tier.
        let new = Customer {
            id: id.to_string(),
            name: id.to_string(),
            budget_nano_usd: None,
            budget_period: BudgetPeriod::default(),
            rpm: None,
            tpm: None,
            created_at: now_micros(),
            max_concurrent_requests: None,
            scheduling_weight: 1,
            default_service_tier: None,
            allow_priority: false,
        };
        let c = fields.applied_to(&new);
        let mut tx = self.write_tx().await?;
        let sql = format!(
            "INSERT INTO customers (id, created_at, {SETTINGS_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        let insert = sqlx::query(&sql).bind(&c.id).bind(c.created_at);
        let result = bind_settings(insert, &c).execute(&mut *tx).await;
        match result {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "customer `{id}` already exists"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        let change = Change {
            action: Action::CustomerCreated,
            target_id: c.id.clone(),
            changes: audited_customer(&c),
        };
        audit::record(&mut tx, self.kind(), actor, &change).await?;
        tx.commit().await?;
        Ok(c)
    }

    /// Creates the customer unless it exists (for the built-in `default` customer).
    pub async fn ensure_customer(&self, id: &str, name: &str) -> StoreResult<()> {
        let fields = CustomerFields {
            name: Some(name.to_string()),
            ..Default::default()
        };
        match self.create_customer(id, fields, &Actor::system()).await {
            Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn list_customers(&self) -> StoreResult<Vec<Customer>> {
        sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers ORDER BY id"
        ))
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(customer)
        .collect()
    }

    /// One customer. On the request path: fails at once while the database is considered
    /// down.
    pub async fn customer(&self, id: &str) -> StoreResult<Customer> {
        if self.is_down() {
            return Err(StoreError::Down);
        }
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await;
        self.observe(&row);
        let row = row?;
        match row {
            Some(row) => customer(&row),
            None => Err(StoreError::NotFound(format!("no customer `{id}`"))),
        }
    }

    pub async fn update_customer(
        &self,
        id: &str,
        fields: CustomerFields,
        actor: &Actor,
    ) -> StoreResult<Customer> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(&format!(
            "SELECT {CUSTOMER_COLUMNS} FROM customers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("no customer `{id}`")));
        };
        let before = customer(&row)?;
        let c = fields.applied_to(&before);
        let update = sqlx::query(
            "UPDATE customers SET name = $2, budget_nano_usd = $3, budget_period = $4, \
             rpm = $5, tpm = $6, max_concurrent_requests = $7, scheduling_weight = $8, \
             default_service_tier = $9, allow_priority = $10 WHERE id = $1",
        )
        .bind(&c.id);
        bind_settings(update, &c).execute(&mut *tx).await?;
        if let Some(changes) = audit::diff(&audited_customer(&before), &audited_customer(&c)) {
            let change = Change {
                action: Action::CustomerUpdated,
                target_id: c.id.clone(),
                changes,
            };
            audit::record(&mut tx, self.kind(), actor, &change).await?;
        }
        tx.commit().await?;
        Ok(c)
    }
}
