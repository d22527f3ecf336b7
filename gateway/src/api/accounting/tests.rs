use super::*;

#[test]
fn a_prompt_counts_once_as_a_choice_reported_it_else_as_prepared() {
    let mut group = vec![
        ChoiceTally::new(10, None, None),
        ChoiceTally::new(10, None, None),
    ];
    assert_eq!(prompt_of(&group), 10);
    group[1].prompt_reported = Some(12);
    assert_eq!(prompt_of(&group), 12);
    assert_eq!(prompt_of(&[]), 0);
}

#[test]
fn the_tier_billed_is_the_one_reported_when_priced_else_the_one_asked() {
    let price = |n: i64| Price {
        input_per_mtok: n.into(),
        output_per_mtok: n.into(),
        cached_input_per_mtok: n.into(),
        rejected_prediction_per_mtok: n.into(),
    };
    let prices = TierPrices {
        priority: Some(price(4)),
        default: Some(price(2)),
        flex: Some(price(1)),
        batch: None,
    };
    let asked = (ServiceTier::Flex, price(1));
    assert_eq!(billed(asked, None, Some(prices)), asked);
    assert_eq!(
        billed(asked, Some(ServiceTier::Default), Some(prices)),
        (ServiceTier::Default, price(2))
    );
    assert_eq!(
        billed(
            (ServiceTier::Priority, price(4)),
            Some(ServiceTier::Flex),
            Some(prices)
        ),
        (ServiceTier::Flex, price(1))
    );
    // Not sold at the tier reported (or no catalogue entry): the tier asked, at its price.
    assert_eq!(billed(asked, Some(ServiceTier::Batch), Some(prices)), asked);
    assert_eq!(billed(asked, Some(ServiceTier::Default), None), asked);
    // A reservation is this gateway's to grant: an upstream claiming one is billed the tier
    // asked, and a request within one is not billed per token whatever is reported.
    assert_eq!(
        billed(asked, Some(ServiceTier::Reserved), Some(prices)),
        asked
    );
    let reserved = (ServiceTier::Reserved, price(0));
    assert_eq!(
        billed(reserved, Some(ServiceTier::Priority), Some(prices)),
        reserved
    );
    // A batch line keeps the batch price whatever its upstream served it at.
    let batch = (ServiceTier::Batch, price(1));
    for served in [
        ServiceTier::Flex,
        ServiceTier::Default,
        ServiceTier::Priority,
    ] {
        assert_eq!(billed(batch, Some(served), Some(prices)), batch);
    }
}

#[test]
fn a_choice_counts_what_its_engine_produced_when_ahead_of_the_stream() {
    let progress = Arc::new(AtomicUsize::new(7));
    let mut c = ChoiceTally::new(3, Some(progress), None);
    c.generated = 5;
    assert_eq!((c.produced(), c.source()), (7, UsageSource::Engine));
    c.generated = 9;
    c.source = Some(UsageSource::Upstream);
    assert_eq!((c.produced(), c.source()), (9, UsageSource::Upstream));
    let mut o = ChoiceTally::new(3, None, Some(Arc::new(AtomicUsize::new(2))));
    assert_eq!((o.source(), o.cached_tokens()), (UsageSource::Observed, 2));
    o.cached_reported = Some(1);
    assert_eq!(o.cached_tokens(), 1);
}
