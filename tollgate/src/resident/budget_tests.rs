use super::*;

const MB: u64 = 1 << 20;

/// A budget of `capacity_mb` with an unpinned slot of each size (MiB), named `m0`, `m1`, ...
fn budget<const N: usize>(capacity_mb: u64, sizes_mb: [u64; N]) -> (Budget, [SlotId; N], Instant) {
    let now = Instant::now();
    let mut b = Budget::new(capacity_mb * MB);
    let mut i = 0;
    let ids = sizes_mb.map(|size| {
        i += 1;
        b.add(&format!("m{i}"), size * MB, false, None, now)
    });
    (b, ids, now)
}

/// Slot `id` pinned, or kept alive for `keep_alive`.
fn set(b: &mut Budget, id: SlotId, pinned: bool, keep_alive: Option<Duration>) {
    let s = b.slot_mut(id).unwrap();
    s.pinned = pinned;
    s.keep_alive = keep_alive;
}

/// `id` asks for a load and gets the plan.
fn ask(b: &mut Budget, id: SlotId) -> Plan {
    b.want(id);
    b.plan(id)
}

fn load(b: &mut Budget, id: SlotId, now: Instant) {
    assert_eq!(ask(b, id), Plan::Load { unload: vec![] });
    b.loaded(id, Some(0.5), now);
}

fn state(b: &Budget, id: SlotId) -> ResidencyState {
    b.slot(id).map_or(ResidencyState::Unloaded, |s| s.state)
}

#[test]
fn models_that_fit_load_side_by_side() {
    let (mut b, [x, y], now) = budget(300, [100, 150]);
    load(&mut b, x, now);
    load(&mut b, y, now);
    assert_eq!(b.used(), 250 * MB);
    assert_eq!(state(&b, x), ResidencyState::Loaded);
    assert_eq!(b.slot(x).unwrap().loads_total, 1);
}

#[test]
fn the_least_recently_used_idle_model_makes_room() {
    let (mut b, [x, y, z], t0) = budget(250, [100, 100, 100]);
    load(&mut b, x, t0);
    load(&mut b, y, t0 + Duration::from_secs(1));
    // x used last: y is the least recently used.
    assert!(b.lease(x, t0 + Duration::from_secs(2)));
    assert!(!b.release(x, t0 + Duration::from_secs(3)));
    assert_eq!(ask(&mut b, z), Plan::Load { unload: vec![y] });
    assert_eq!(state(&b, y), ResidencyState::Unloaded);
    assert_eq!(state(&b, x), ResidencyState::Loaded);
    assert_eq!(state(&b, z), ResidencyState::Loading);
    assert_eq!(b.slot(y).unwrap().unloads_total, 1);
}

#[test]
fn a_busy_model_drains_before_it_unloads_and_takes_no_new_request() {
    let (mut b, [x, y], now) = budget(100, [100, 100]);
    load(&mut b, x, now);
    assert!(b.lease(x, now));
    assert_eq!(ask(&mut b, y), Plan::Wait { unload: vec![] });
    assert_eq!(state(&b, x), ResidencyState::Draining);
    assert!(!b.lease(x, now), "a draining model takes no new request");
    assert_eq!(b.plan(y), Plan::Wait { unload: vec![] });
    // Its last request ends: it unloads, and y loads.
    assert!(b.release(x, now));
    assert_eq!(state(&b, x), ResidencyState::Unloaded);
    assert_eq!(b.plan(y), Plan::Load { unload: vec![] });
}

#[test]
fn pinned_models_are_never_unloaded() {
    let (mut b, [p, x, y], now) = budget(200, [100, 100, 100]);
    set(&mut b, p, true, Some(Duration::ZERO));
    b.start_loading(p);
    b.loaded(p, Some(1.0), now);
    load(&mut b, x, now);
    assert_eq!(ask(&mut b, y), Plan::Load { unload: vec![x] });
    assert_eq!(state(&b, p), ResidencyState::Loaded);
    assert!(b.expired(now + Duration::from_secs(3600)).is_empty());
}

#[test]
fn models_take_turns_in_the_order_they_were_asked_for() {
    let (mut b, [x, y, z], now) = budget(100, [100, 100, 100]);
    load(&mut b, x, now);
    assert!(b.lease(x, now));
    b.want(y);
    b.want(z);
    // z asked after y: it waits even once there is room.
    assert_eq!(b.plan(z), Plan::Wait { unload: vec![] });
    assert_eq!(b.plan(y), Plan::Wait { unload: vec![] });
    assert!(b.release(x, now));
    assert_eq!(b.plan(z), Plan::Wait { unload: vec![] });
    assert_eq!(b.plan(y), Plan::Load { unload: vec![] });
    b.loaded(y, Some(0.1), now);
    // Now z is first in line: y, idle, makes room.
    assert_eq!(b.plan(z), Plan::Load { unload: vec![y] });
}

#[test]
fn a_model_with_requests_waiting_for_it_is_not_taken_away() {
    let (mut b, [x, y], now) = budget(100, [100, 100]);
    load(&mut b, x, now);
    b.slot_mut(x).unwrap().waiting = 1;
    assert_eq!(ask(&mut b, y), Plan::Wait { unload: vec![] });
    assert_eq!(state(&b, x), ResidencyState::Loaded);
    b.slot_mut(x).unwrap().waiting = 0;
    assert_eq!(b.plan(y), Plan::Load { unload: vec![x] });
}

#[test]
fn a_model_larger_than_the_budget_loads_alone() {
    let (mut b, [x, big], now) = budget(100, [50, 500]);
    load(&mut b, x, now);
    assert_eq!(ask(&mut b, big), Plan::Load { unload: vec![x] });
    assert_eq!(b.used(), 500 * MB);
}

#[test]
fn keep_alive_unloads_idle_models_only() {
    let (mut b, [x, y, z], t0) = budget(1000, [100, 100, 100]);
    for id in [x, y] {
        set(&mut b, id, false, Some(Duration::from_secs(60)));
    }
    for id in [x, y, z] {
        load(&mut b, id, t0);
    }
    assert!(b.lease(y, t0));
    assert!(b.expired(t0 + Duration::from_secs(59)).is_empty());
    assert_eq!(b.expired(t0 + Duration::from_secs(60)), vec![x]);
    // y is in use; z has no keep_alive.
    assert_eq!(state(&b, y), ResidencyState::Loaded);
    assert_eq!(state(&b, z), ResidencyState::Loaded);
}

#[test]
fn a_retired_model_finishes_its_requests_then_leaves_the_budget() {
    let (mut b, [x, y], now) = budget(1000, [100, 100]);
    load(&mut b, x, now);
    load(&mut b, y, now);
    assert!(b.lease(x, now));
    assert!(!b.retire(x));
    assert_eq!(state(&b, x), ResidencyState::Draining);
    assert!(b.release(x, now));
    assert!(b.slot(x).is_none());
    assert!(b.retire(y), "idle: unloaded at once");
    assert!(b.slot(y).is_none());
    assert_eq!(b.used(), 0);
}

#[test]
fn a_failed_load_leaves_the_model_unloaded() {
    let (mut b, [x], now) = budget(100, [100]);
    assert_eq!(ask(&mut b, x), Plan::Load { unload: vec![] });
    b.loaded(x, None, now);
    assert_eq!(state(&b, x), ResidencyState::Unloaded);
    assert_eq!(b.used(), 0);
    assert_eq!(b.slot(x).unwrap().loads_total, 0);
}
