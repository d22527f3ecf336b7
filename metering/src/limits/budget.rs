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
        let ask = Ask {
            scope,
            label,
            budget,
            amount,
            period_start,
            retry_after: Duration::from_micros(u64::try_from(next - now).unwrap_or(0)),
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
                Ok(check) => return self.held_in_shared(&ask, hold_id, &check),
                Err(e) => warn_fallback(&e),
            }
        }
        self.load_month(store, scope, period_start).await?;
        self.reserve_here(&ask)
    }

    /// The shared database's answer to a reservation, also kept as this replica's view for
    /// when the database cannot be asked.
    fn held_in_shared(
        &self,
        ask: &Ask<'_>,
        hold_id: &str,
        check: &shared_limits::BudgetCheck,
    ) -> Result<BudgetHold, BudgetError> {
        let committed = check.committed_before + if check.held { ask.amount } else { 0 };
        self.budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                ask.scope.clone(),
                BudgetState {
                    period_start: ask.period_start,
                    spent: committed,
                    reserved: 0,
                },
            );
        if !check.held {
            return Err(ask.refusal(check.committed_before).into());
        }
        Ok(ask.hold(ask.amount, Some(hold_id.to_string())))
    }

    /// Reads `scope`'s spending of the month from the ledger unless this replica knows it.
    async fn load_month(
        &self,
        store: Option<&Store>,
        scope: &BudgetScope,
        period_start: i64,
    ) -> Result<(), BudgetError> {
        let known = {
            let budgets = self
                .budgets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            budgets
                .get(scope)
                .is_some_and(|b| b.period_start == period_start)
        };
        if known {
            return Ok(());
        }
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
        Ok(())
    }

    /// Reserves in this replica's view of the month.
    fn reserve_here(&self, ask: &Ask<'_>) -> Result<BudgetHold, BudgetError> {
        let mut budgets = self
            .budgets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(state) = budgets.get_mut(ask.scope) else {
            return Ok(ask.hold(0, None));
        };
        if state.spent + state.reserved + ask.amount > ask.budget {
            return Err(ask.refusal(state.spent + state.reserved).into());
        }
        state.reserved += ask.amount;
        Ok(ask.hold(ask.amount, None))
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

/// One reservation asked of a scope's budget this month.
struct Ask<'a> {
    scope: &'a BudgetScope,
    /// Names the budget in a refusal.
    label: &'a str,
    budget: i64,
    amount: i64,
    period_start: i64,
    /// Until the month ends.
    retry_after: Duration,
}

impl Ask<'_> {
    /// The refusal when `committed` (spent or reserved) leaves no room for the amount.
    fn refusal(&self, committed: i64) -> Refusal {
        Refusal::Quota {
            message: format!(
                "you exceeded your current quota: this request may cost up to {} USD, and {} USD \
                 of the {} USD {} is spent or reserved",
                crate::money::format_usd(self.amount),
                crate::money::format_usd(committed),
                crate::money::format_usd(self.budget),
                self.label,
            ),
            retry_after: self.retry_after,
        }
    }

    fn hold(&self, amount: i64, shared: Option<String>) -> BudgetHold {
        BudgetHold {
            scope: self.scope.clone(),
            period_start: self.period_start,
            amount,
            shared,
            key: None,
        }
    }
}
