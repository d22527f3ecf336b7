use super::*;
use chrono::Utc;

fn limits(rpm: Option<i64>, tpm: Option<i64>) -> Limits {
    Limits {
        key_id: "k".into(),
        customer_id: "c".into(),
        key_rpm: rpm,
        key_tpm: None,
        customer_rpm: None,
        customer_tpm: tpm,
    }
}

#[tokio::test]
async fn request_bucket_refuses_past_the_limit() {
    let l = Limiter::default();
    let lim = limits(Some(3), None);
    for _ in 0..3 {
        l.admit_request(&lim).await.unwrap();
    }
    match l.admit_request(&lim).await {
        Err(Refusal::Rate { retry_after, .. }) => {
            // One request refills in 20 s at 3/min.
            assert!(
                retry_after > Duration::from_secs(19) && retry_after <= Duration::from_secs(20)
            );
        }
        other => panic!("expected a rate refusal, got {other:?}"),
    }
    let s = l.status(&lim);
    assert_eq!(s.requests.unwrap().limit, 3);
    assert_eq!(s.requests.unwrap().remaining, 0);
    assert!(s.tokens.is_none());
}

/// Buckets refill at the limit per minute, continuously: measured on tokio's paused clock,
/// not by waiting.
#[tokio::test(start_paused = true)]
async fn buckets_refill_at_the_limit_per_minute() {
    let l = Limiter::default();
    let lim = limits(Some(3), None);
    for _ in 0..3 {
        l.admit_request(&lim).await.unwrap();
    }
    assert!(l.admit_request(&lim).await.is_err());
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(
        l.admit_request(&lim).await.is_err(),
        "19 s refill less than one"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    l.admit_request(&lim).await.unwrap();
    assert!(
        l.admit_request(&lim).await.is_err(),
        "one, then empty again"
    );
    // Never past the limit, however long it rests.
    tokio::time::advance(Duration::from_secs(3_600)).await;
    assert_eq!(l.status(&lim).requests.unwrap().remaining, 3);
    let tokens = limits(None, Some(600));
    l.reserve_tokens(&tokens, 600).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(l.status(&tokens).tokens.unwrap().remaining, 300);
}

#[tokio::test]
async fn token_reservations_are_settled_back() {
    let l = Limiter::default();
    let lim = limits(None, Some(1000));
    let hold = l.reserve_tokens(&lim, 800).await.unwrap();
    assert!(l.reserve_tokens(&lim, 300).await.is_err());
    l.settle_tokens(&hold, 100);
    let s = l.status(&lim).tokens.unwrap();
    assert!((899..=901).contains(&s.remaining), "{s:?}");
    assert!(l.reserve_tokens(&lim, 300).await.is_ok());
    // More than the whole limit can never pass.
    assert!(matches!(
        l.reserve_tokens(&lim, 1001).await,
        Err(Refusal::Rate { .. })
    ));
}

#[tokio::test]
async fn key_budgets_hold_beside_the_customer_budget() {
    let l = Limiter::default();
    let now = Utc::now().timestamp_micros();
    // Customer budget 1000, key budget 500.
    let both = |amount| l.reserve_budgets(None, "r", ("c", Some(1000)), ("k", Some(500)), amount);
    let h = both(400).await.unwrap().unwrap();
    // The key's 100 left refuses 200, naming the key's budget, and gives the customer's
    // reservation back.
    let Err(BudgetError::Refused(Refusal::Quota { message, .. })) = both(200).await else {
        panic!("the key budget must refuse")
    };
    assert!(message.contains("monthly budget of key k"), "{message}");
    // Another key of the customer still has the customer's 600.
    let other = l
        .reserve_budgets(None, "r2", ("c", Some(1000)), ("k2", None), 600)
        .await
        .unwrap()
        .unwrap();
    l.settle_spend(Some(&other), "c", "k2", now, 600);
    // Settled at 350: the key has 150 left, the customer 1000 - 600 - 350 = 50.
    l.settle_spend(Some(&h), "c", "k", now, 350);
    let Err(BudgetError::Refused(Refusal::Quota { message, .. })) = both(60).await else {
        panic!("the customer budget must refuse")
    };
    assert!(message.contains("USD monthly budget is"), "{message}");
    assert!(both(50).await.is_ok());
    // A key budget alone (its customer has none).
    let only = |amount| l.reserve_budgets(None, "r3", ("d", None), ("kd", Some(100)), amount);
    let h = only(100).await.unwrap().unwrap();
    assert!(matches!(only(1).await, Err(BudgetError::Refused(_))));
    l.release_budget(&h);
    assert!(only(100).await.is_ok());
    assert!(l
        .reserve_budgets(None, "r4", ("e", None), ("ke", None), 5)
        .await
        .unwrap()
        .is_none());
}

/// A budget is per UTC month by the limiter's clock: a second before the month ends, the
/// spent budget refuses and says to retry in that second; once the clock crosses into the
/// next month the whole budget is there again, and a hold taken in the old month and settled
/// in the new one counts in neither.
#[tokio::test]
async fn a_budget_starts_again_when_the_clock_crosses_into_the_next_month() {
    use chrono::TimeZone;
    let last_second = Utc
        .with_ymd_and_hms(2026, 11, 30, 23, 59, 59)
        .unwrap()
        .timestamp_micros();
    let clock = crate::clock::Clock::manual_at(last_second);
    let l = Limiter::default().with_clock(clock.clone());
    let both = |id: &'static str, amount| {
        l.reserve_budgets(None, id, ("c", Some(2000)), ("k", Some(800)), amount)
    };
    let spent = both("r1", 600).await.unwrap().unwrap();
    l.settle_spend(Some(&spent), "c", "k", last_second, 600);
    let late = both("r2", 200).await.unwrap().unwrap();
    let Err(BudgetError::Refused(Refusal::Quota {
        message,
        retry_after,
    })) = both("r3", 300).await
    else {
        panic!("the month's budget must refuse")
    };
    assert!(message.contains("monthly budget of key k"), "{message}");
    assert_eq!(
        retry_after,
        Duration::from_secs(1),
        "the month ends in a second"
    );

    clock.advance(Duration::from_secs(1));
    // December: settling November's hold changes nothing now.
    l.settle_spend(Some(&late), "c", "k", last_second, 200);
    let december = both("r4", 800).await.unwrap().unwrap();
    assert!(
        matches!(both("r5", 1).await, Err(BudgetError::Refused(_))),
        "the key's 800 is held"
    );
    l.release_budget(&december);
    let customer = l
        .reserve_budgets(None, "r6", ("c", Some(2000)), ("k2", None), 2000)
        .await
        .unwrap();
    assert!(customer.is_some(), "the customer's whole 2000");
}

#[tokio::test]
async fn budget_never_overshoots_with_reservations() {
    let l = Limiter::default();
    let h1 = l.reserve_budget(None, "r", "c", 1000, 600).await.unwrap();
    assert!(matches!(
        l.reserve_budget(None, "r", "c", 1000, 600).await,
        Err(BudgetError::Refused(Refusal::Quota { .. }))
    ));
    l.settle_budget(&h1, 100);
    let h2 = l.reserve_budget(None, "r", "c", 1000, 600).await.unwrap();
    l.settle_budget(&h2, 600);
    // 700 spent: 300 left.
    assert!(l
        .reserve_budget(None, "r", "c", 1000, 301)
        .await
        .is_err_and(|e| matches!(e, BudgetError::Refused(_))));
    assert!(l.reserve_budget(None, "r", "c", 1000, 300).await.is_ok());
}
