//! Budgets, per customer and per key: a request reserves its maximum cost before it runs and
//! settles on its actual cost after (see the module above). Each scope's month of spending is
//! read from the ledger once, then kept current in memory; on a shared database the
//! reservation is kept there instead (`crate::shared_limits`).

use std::time::Duration;

use super::{warn_fallback, BudgetError, Limiter, Refusal};
use crate::kinds::BudgetScope;
use crate::periods::month_bounds;
use crate::shared_limits::{self, key_hold_id};
use crate::store::Store;

#[derive(Debug)]
pub(super) struct BudgetState {
    period_start: i64,
    spent: i64,
    reserved: i64,
}

/// A budget reservation to settle when the request ends.
#[derive(Debug, Clone)]
pub struct BudgetHold {
    scope: BudgetScope,
    period_start: i64,
    amount: i64,
    /// Held in the shared database under this id (the request id); the usage record's arrival
    /// in the ledger releases it.
    shared: Option<String>,
    /// The same request's hold on its key's own budget ([`BudgetScope::Key`]).
    key: Option<Box<BudgetHold>>,
}

impl Limiter {
    /// Reserves `amount` nano-USD of a customer's monthly `budget`.
    pub async fn reserve_budget(
        &self,
        store: Option<&Store>,
        hold_id: &str,
        customer_id: &str,
        budget: i64,
        amount: i64,
    ) -> Result<BudgetHold, BudgetError> {
        self.reserve_scope(
            store,
            hold_id,
            &BudgetScope::Customer(customer_id.to_string()),
            "monthly budget",
            budget,
            amount,
        )
        .await
    }

    /// Reserves `amount` of the customer's budget (when it has one) and of the key's own
    /// budget (when it has one), as one hold; `Ok(None)` when neither has a budget. A
    /// refusal of the key's budget (or a failure to read it) gives the customer's reservation
    /// back.
    pub async fn reserve_budgets(
        &self,
        store: Option<&Store>,
        request_id: &str,
        customer: (&str, Option<i64>),
        key: (&str, Option<i64>),
        amount: i64,
    ) -> Result<Option<BudgetHold>, BudgetError> {
        let customer_hold = match customer.1 {
            None => None,
            Some(budget) => Some(
                self.reserve_budget(store, request_id, customer.0, budget, amount)
                    .await?,
            ),
        };
        let Some(key_budget) = key.1 else {
            return Ok(customer_hold);
        };
        let label = format!("monthly budget of key {}", key.0);
        let key_hold = self
            .reserve_scope(
                store,
                &key_hold_id(request_id),
                &BudgetScope::Key(key.0.to_string()),
                &label,
                key_budget,
                amount,
            )
            .await;
        match (key_hold, customer_hold) {
            (Ok(k), Some(mut c)) => {
                c.key = Some(Box::new(k));
                Ok(Some(c))
            }
            (Ok(k), None) => Ok(Some(k)),
            (Err(e), customer_hold) => {
                if let Some(c) = &customer_hold {
                    self.release_budget(c);
                }
                Err(e)
            }
        }
    }

    /// Reserves `amount` nano-USD of `scope`'s monthly `budget` (`label` names it in a refusal).
    async fn reserve_scope(
        &self,
        store: Option<&Store>,
        hold_id: &str,
        scope: &BudgetScope,
        label: &str,
        budget: i64,
        amount: i64,
    ) -> Result<BudgetHold, BudgetError> {
        let now = self.clock.now_micros();
        let (period_start, next) = month_bounds(now);
        let quota = |committed: i64| {
            Refusal::Quota {
            message: format!(
                "you exceeded your current quota: this request may cost up to {} USD, and {} USD of the {} USD {label} is spent or reserved",
                crate::money::format_usd(amount),
                crate::money::format_usd(committed),
                crate::money::format_usd(budget),
            ),
            retry_after: Duration::from_micros((next - now).max(0) as u64),
        }
        };
        if let Some(shared) = self.shared.as_ref().filter(|s| !s.is_down()) {
            let checked = shared_limits::hold_budget(
                shared.pool(),
                hold_id,
                &scope.stored(),
                period_start,
                budget,
                amount,
            )
            .await;
            shared.observe(&checked);
            match checked {
                Ok(check) => {
                    // This replica's view, for when the database cannot be asked.
                    let committed = check.committed_before + if check.held { amount } else { 0 };
                    self.budgets
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(
                            scope.clone(),
                            BudgetState {
                                period_start,
                                spent: committed,
                                reserved: 0,
                            },
                        );
                    if !check.held {
                        return Err(quota(check.committed_before).into());
                    }
                    return Ok(BudgetHold {
                        scope: scope.clone(),
                        period_start,
                        amount,
                        shared: Some(hold_id.to_string()),
                        key: None,
                    });
                }
                Err(e) => warn_fallback(&e),
            }
        }
        let known = {
            let budgets = self
                .budgets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            budgets
                .get(scope)
                .is_some_and(|b| b.period_start == period_start)
        };
        if !known {
            let spent = match store {
                Some(s) => s.scope_spent_since(scope, period_start).await?,
                None => 0,
            };
            let mut budgets = self
                .budgets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = budgets.entry(scope.clone());
            let state = entry.or_insert(BudgetState {
                period_start,
                spent,
                reserved: 0,
            });
            if state.period_start != period_start {
                *state = BudgetState {
                    period_start,
                    spent,
                    reserved: 0,
                };
            }
        }
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(state) = budgets.get_mut(scope) else {
            return Ok(BudgetHold {
                scope: scope.clone(),
                period_start,
                amount: 0,
                shared: None,
                key: None,
            });
        };
        if state.spent + state.reserved + amount > budget {
            return Err(quota(state.spent + state.reserved).into());
        }
        state.reserved += amount;
        Ok(BudgetHold {
            scope: scope.clone(),
            period_start,
            amount,
            shared: None,
            key: None,
        })
    }

    /// Replaces a budget reservation by the actual cost. A shared hold is released by its
    /// usage record reaching the ledger instead.
    pub fn settle_budget(&self, hold: &BudgetHold, actual: i64) {
        if let Some(key) = &hold.key {
            self.settle_budget(key, actual);
        }
        if hold.shared.is_some() {
            return;
        }
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(state) = budgets.get_mut(&hold.scope) {
            if state.period_start == hold.period_start {
                state.reserved -= hold.amount;
                state.spent += actual;
            }
        }
    }

    /// Gives a reservation back whole: its request never reached a model, so no usage record
    /// will follow.
    pub fn release_budget(&self, hold: &BudgetHold) {
        if let Some(key) = &hold.key {
            self.release_budget(key);
        }
        match (&hold.shared, &self.shared) {
            (Some(id), Some(store)) => {
                let (tracked, id) = (store.clone(), id.clone());
                store.spawn_background(async move {
                    let store = tracked;
                    if let Err(e) = shared_limits::release_hold(store.pool(), &id).await {
                        tracing::warn!(
                            "cannot release budget hold {id} (it expires by itself): {e}"
                        );
                    }
                });
            }
            _ => {
                let mut alone = hold.clone();
                alone.key = None;
                self.settle_budget(&alone, 0);
            }
        }
    }

    /// Settles a request's spending: its holds (customer and key) by the actual cost, and the
    /// scopes it held nothing against noted, so a budget set later starts from the right
    /// figure.
    pub fn settle_spend(
        &self,
        hold: Option<&BudgetHold>,
        customer_id: &str,
        key_id: &str,
        started_at: i64,
        actual: i64,
    ) {
        let mut held = Vec::new();
        let mut next = hold;
        while let Some(h) = next {
            held.push(h.scope.clone());
            next = h.key.as_deref();
        }
        if let Some(h) = hold {
            self.settle_budget(h, actual);
        }
        for scope in [
            BudgetScope::Customer(customer_id.to_string()),
            BudgetScope::Key(key_id.to_string()),
        ] {
            if !held.contains(&scope) {
                self.note_spent(&scope, started_at, actual);
            }
        }
    }

    /// Records spending that had no reservation (scopes without a budget), so a budget set
    /// later in the month starts from the right figure.
    pub fn note_spent(&self, scope: &BudgetScope, started_at: i64, actual: i64) {
        let (period_start, _) = month_bounds(started_at);
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(state) = budgets.get_mut(scope) {
            if state.period_start == period_start {
                state.spent += actual;
            }
        }
    }
}
