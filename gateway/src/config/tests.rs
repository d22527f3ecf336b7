//! The catalogue's validation: defaults, typos named, paths resolved, refusals.
use std::str::FromStr;

use rust_decimal::Decimal;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::money::{PriceTable, TierPrices};

use super::*;

const GOOD: &str = r#"
    [server]
    max_n = 4
    [models."smollm2-135m"]
    source = { path = "models/x.gguf" }
    backend = { type = "local", weights = "q8_0" }
    price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }
    [models.remote]
    source = { hf_repo = "org/repo", file = "m.gguf" }
    backend = { type = "http", urls = ["http://w1:8081"] }
"#;

/// Why the catalogue `toml` is refused.
fn refused(toml: &str) -> String {
    Config::from_toml_str(toml, Path::new("."))
        .unwrap_err()
        .to_string()
}

/// The prices of the local model of the catalogue `toml`.
fn prices_of(toml: &str) -> TierPrices {
    Config::from_toml_str(toml, Path::new(".")).unwrap().models["smollm2-135m"].prices
}

#[test]
fn parses_and_fills_defaults() {
    let c = Config::from_toml_str(GOOD, Path::new("/etc/tollgate")).unwrap();
    assert_eq!(c.server.max_n, 4);
    let m = &c.models["smollm2-135m"];
    assert_eq!(
        m.source,
        Some(ModelSource::Path("/etc/tollgate/models/x.gguf".into()))
    );
    let BackendConfig::Local(local) = &m.backend else {
        panic!("local")
    };
    assert_eq!(local.device, DeviceSpec::Cpu);
    assert_eq!(local.weights, WeightForm::Q8_0);
    let price = m.prices.get(ServiceTier::Default).unwrap();
    assert_eq!(price.input_per_mtok, Decimal::from_str("0.05").unwrap());
    // No cached price: cached prompt tokens cost the input price.
    assert_eq!(price.cached_input_per_mtok, price.input_per_mtok);
    let r = &c.models["remote"];
    assert_eq!(
        r.source,
        Some(ModelSource::Hub {
            repo: "org/repo".into(),
            revision: "main".into(),
            file: Some("m.gguf".into())
        })
    );
}

#[test]
fn cached_input_price_is_optional_exact_and_checked() {
    let with = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\", cached_input_per_mtok = \"0.0125\" }",
    );
    let c = Config::from_toml_str(&with, Path::new(".")).unwrap();
    let p = c.models["smollm2-135m"]
        .prices
        .get(ServiceTier::Default)
        .unwrap();
    assert_eq!(
        p.cached_input_per_mtok,
        Decimal::from_str("0.0125").unwrap()
    );
    assert_eq!(p.input_per_mtok, Decimal::from_str("0.05").unwrap());
    let negative = with.replace("\"0.0125\"", "\"-1\"");
    let e = refused(&negative);
    assert!(
        e.contains("price.cached_input_per_mtok `-1` is negative"),
        "{e}"
    );
}

/// Rejected prediction tokens cost the output price unless priced (OpenAI's rule), in each
/// tier as its own output price; a price of their own is exact and checked.
#[test]
fn rejected_prediction_price_defaults_to_the_output_price_and_is_checked() {
    let d = |v: &str| Decimal::from_str(v).unwrap();
    let prices = prices_of(GOOD);
    for (tier, output) in [(ServiceTier::Default, "0.10"), (ServiceTier::Flex, "0.05")] {
        assert_eq!(
            prices.get(tier).unwrap().rejected_prediction_per_mtok,
            d(output)
        );
    }
    // A price of its own is exact and halved for batch with the rest; a tier table of its
    // own without one: that tier's output price.
    let own = "rejected_prediction_per_mtok = \"0.020\", \
               batch = { input_per_mtok = \"0.04\", output_per_mtok = \"0.08\" } }";
    let set = GOOD.replace("\"0.10\" }", &format!("\"0.10\", {own}"));
    let prices = prices_of(&set);
    let rejected = |tier| prices.get(tier).unwrap().rejected_prediction_per_mtok;
    assert_eq!(rejected(ServiceTier::Default).to_string(), "0.020");
    assert_eq!(rejected(ServiceTier::Flex), d("0.01"));
    assert_eq!(rejected(ServiceTier::Batch), d("0.08"));
    let e = refused(&set.replace("\"0.020\"", "\"-2\""));
    assert!(
        e.contains("price.rejected_prediction_per_mtok `-2` is negative"),
        "{e}"
    );
}

#[test]
fn tier_prices_default_to_half_and_the_multiplier_and_are_checked() {
    let d = |v: &str| Decimal::from_str(v).unwrap();
    let prices = prices_of(GOOD);
    // Unset: flex and batch at half the default prices, priority at the default ones.
    for tier in [ServiceTier::Flex, ServiceTier::Batch] {
        let p = prices.get(tier).unwrap();
        assert_eq!(
            (p.input_per_mtok, p.output_per_mtok),
            (d("0.025"), d("0.05"))
        );
        assert_eq!(p.cached_input_per_mtok, d("0.025"));
    }
    assert_eq!(
        prices.get(ServiceTier::Priority),
        prices.get(ServiceTier::Default)
    );

    let set = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\", priority_multiplier = \"1.5\", \
         flex = { input_per_mtok = \"0.04\", output_per_mtok = \"0.08\" } }",
    );
    let prices = prices_of(&set);
    let p = prices.get(ServiceTier::Priority).unwrap();
    assert_eq!(
        (p.input_per_mtok, p.output_per_mtok),
        (d("0.075"), d("0.15"))
    );
    let f = prices.get(ServiceTier::Flex).unwrap();
    assert_eq!(
        (f.input_per_mtok, f.cached_input_per_mtok, f.output_per_mtok),
        (d("0.04"), d("0.04"), d("0.08"))
    );
    assert_eq!(
        prices.get(ServiceTier::Batch).unwrap().output_per_mtok,
        d("0.05")
    );

    let bad = set.replace("\"0.08\"", "\"-0.08\"");
    let e = refused(&bad);
    assert!(
        e.contains("price.flex.output_per_mtok `-0.08` is negative"),
        "{e}"
    );
}

#[test]
fn a_tier_left_out_of_service_tiers_has_no_price() {
    let only = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\" }\nservice_tiers = [\"default\", \"batch\"]",
    );
    let prices = prices_of(&only);
    assert!(prices.get(ServiceTier::Default).is_some());
    assert!(prices.get(ServiceTier::Batch).is_some());
    assert_eq!(prices.get(ServiceTier::Flex), None);
    assert_eq!(prices.get(ServiceTier::Priority), None);
    let unknown = only.replace("\"batch\"]", "\"scale\"]");
    assert!(Config::from_toml_str(&unknown, Path::new(".")).is_err());
    let empty = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\" }\nservice_tiers = []",
    );
    let e = refused(&empty);
    assert!(e.contains("service_tiers is empty"), "{e}");
}

#[test]
fn kv_cache_dtype_is_typed_at_validation() {
    let half = GOOD.replace(
        "weights = \"q8_0\"",
        "weights = \"q8_0\", kv_cache_dtype = \"f16\"",
    );
    let c = Config::from_toml_str(&half, Path::new(".")).unwrap();
    let BackendConfig::Local(local) = &c.models["smollm2-135m"].backend else {
        panic!("local backend expected");
    };
    assert_eq!(local.kv_cache_dtype, Some(KvCacheDtype::F16));
    let bad = GOOD.replace(
        "weights = \"q8_0\"",
        "weights = \"q8_0\", kv_cache_dtype = \"int4\"",
    );
    let e = refused(&bad);
    assert!(e.contains("int4"), "{e}");
}

#[test]
fn speculation_is_a_setting_per_model() {
    let local_of = |toml: &str| {
        let c = Config::from_toml_str(toml, Path::new(".")).unwrap();
        let BackendConfig::Local(local) = &c.models["smollm2-135m"].backend else {
            panic!("local backend expected");
        };
        (local.speculative_draft, local.speculative_max_batch)
    };
    assert_eq!(local_of(GOOD), (None, None), "the engine's defaults");
    let off = GOOD.replace(
        "weights = \"q8_0\"",
        "weights = \"q8_0\", speculative_draft = 0, speculative_max_batch = 2",
    );
    assert_eq!(local_of(&off), (Some(0), Some(2)));
    let e = refused(&GOOD.replace("weights = \"q8_0\"", "speculative_draft = -1"));
    assert!(e.contains("speculative_draft"), "{e}");
}

#[test]
fn unknown_keys_are_named() {
    let bad = GOOD.replace("max_n = 4", "max_m = 4");
    let e = refused(&bad);
    assert!(e.contains("max_m"), "{e}");
    let bad = GOOD.replace("weights = \"q8_0\"", "wieghts = \"q8_0\"");
    let e = refused(&bad);
    assert!(e.contains("wieghts"), "{e}");
}

#[test]
fn only_http_backends_may_leave_out_the_source() {
    let http = r#"
        [models.remote]
        backend = { type = "http", urls = ["http://w1:8081"] }
    "#;
    let c = Config::from_toml_str(http, Path::new("/")).unwrap();
    assert_eq!(c.models["remote"].source, None);
    let local = r#"
        [models.here]
        backend = { type = "local" }
    "#;
    let e = Config::from_toml_str(local, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("here") && e.contains("source is missing"), "{e}");
}

#[test]
fn http_discovery_is_static_unless_dns() {
    let discovery = |extra: &str| {
        let toml = format!(
            "[models.remote]\nbackend = {{ type = \"http\", urls = [\"http://w:8081\"]{extra} }}"
        );
        Config::from_toml_str(&toml, Path::new("/")).map(|c| match &c.models["remote"].backend {
            BackendConfig::Http(h) => h.discover,
            BackendConfig::Local(_) => unreachable!(),
        })
    };
    use crate::config::Discovery;
    assert_eq!(discovery("").unwrap(), Discovery::Static);
    assert_eq!(
        discovery(", discover = \"static\"").unwrap(),
        Discovery::Static
    );
    assert_eq!(discovery(", discover = \"dns\"").unwrap(), Discovery::Dns);
    let e = discovery(", discover = \"consul\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("remote") && e.contains("`consul`"), "{e}");
}

#[test]
fn http_responses_are_translated_unless_passed_through() {
    let mode = |extra: &str| {
        let toml = format!(
            "[models.remote]\nbackend = {{ type = \"http\", urls = [\"http://w:8081\"]{extra} }}"
        );
        Config::from_toml_str(&toml, Path::new("/")).map(|c| match &c.models["remote"].backend {
            BackendConfig::Http(h) => h.responses,
            BackendConfig::Local(_) => unreachable!(),
        })
    };
    assert_eq!(mode("").unwrap(), ResponsesMode::Translate);
    assert_eq!(
        mode(", responses = \"passthrough\"").unwrap(),
        ResponsesMode::Passthrough
    );
    let e = mode(", responses = \"native\"").unwrap_err().to_string();
    assert!(e.contains("remote") && e.contains("`native`"), "{e}");
}

#[test]
fn rejects_float_prices_and_bad_sources() {
    let bad = GOOD.replace("\"0.05\"", "0.05");
    assert!(Config::from_toml_str(&bad, Path::new(".")).is_err());
    let bad = GOOD.replace("\"0.05\"", "\"cheap\"");
    let e = refused(&bad);
    assert!(e.contains("smollm2-135m") && e.contains("cheap"), "{e}");
    let bad = GOOD.replace("source = { path = \"models/x.gguf\" }", "source = { }");
    let e = refused(&bad);
    assert!(e.contains("needs `path` or `hf_repo`"), "{e}");
    assert!(matches!(
        Config::from_toml_str("", Path::new(".")),
        Err(ConfigError::NoModels)
    ));
}

#[test]
fn the_repo_catalogue_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models.toml");
    let c = Config::load(&path).unwrap();
    assert!(c.models.contains_key("smollm2-135m"));
}

/// Device and weight form are parsed with the catalogue, so a misspelt one stops the server
/// before any model loads, naming the value.
#[test]
fn device_and_weights_are_parsed_when_the_catalogue_is() {
    let local = |backend: &str| {
        let text = GOOD.replace(
            "backend = { type = \"local\", weights = \"q8_0\" }",
            &format!("backend = {{ type = \"local\", {backend} }}"),
        );
        Config::from_toml_str(&text, Path::new("/etc/tollgate")).map(|c| {
            match &c.models["smollm2-135m"].backend {
                BackendConfig::Local(l) => (l.device, l.weights),
                BackendConfig::Http(_) => panic!("a local backend"),
            }
        })
    };
    assert_eq!(
        local("device = \"cuda:1\", weights = \"native\"").unwrap(),
        (DeviceSpec::Cuda(1), WeightForm::Native)
    );
    assert_eq!(
        local("device = \"cuda\"").unwrap(),
        (DeviceSpec::Cuda(0), WeightForm::Auto)
    );
    assert_eq!(local("weights = \"q8\"").unwrap().1, WeightForm::Q8_0);
    assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    let e = local("device = \"gpu\"").unwrap_err().to_string();
    assert!(e.contains("`gpu` is not a device"), "{e}");
    let e = local("weights = \"q5_k\"").unwrap_err().to_string();
    assert!(e.contains("q5_k") && e.contains("native"), "{e}");
}

#[test]
fn an_http_pool_routes_least_busy_unless_told_by_customer() {
    use crate::config::Routing;
    let pool = |extra: &str| {
        Config::from_toml_str(
            &format!(
                "[models.up]\nbackend = {{ type = \"http\", urls = [\"http://w:8000\"]{extra} }}\n"
            ),
            Path::new("."),
        )
    };
    let routing = |c: Config| match &c.models["up"].backend {
        BackendConfig::Http(http) => http.routing,
        BackendConfig::Local(_) => panic!("http backend expected"),
    };
    assert_eq!(routing(pool("").unwrap()), Routing::LeastBusy);
    assert_eq!(
        routing(pool(", routing = \"customer\"").unwrap()),
        Routing::Customer
    );
    let e = pool(", routing = \"sticky\"").unwrap_err().to_string();
    assert!(e.contains("backend.routing `sticky`"), "{e}");
}

#[test]
fn key_cache_lifetimes_are_server_settings() {
    let c = Config::from_toml_str(GOOD, Path::new(".")).unwrap();
    assert_eq!(
        (c.server.key_fresh, c.server.key_max_age),
        (Duration::from_millis(400), Duration::from_millis(900))
    );
    let set = GOOD.replace(
        "max_n = 4",
        "max_n = 4\nkey_cache_fresh_ms = 0\nkey_cache_max_age_ms = 0",
    );
    let c = Config::from_toml_str(&set, Path::new(".")).unwrap();
    assert_eq!(
        (c.server.key_fresh, c.server.key_max_age),
        (Duration::ZERO, Duration::ZERO)
    );
    let longer_fresh = GOOD.replace("max_n = 4", "max_n = 4\nkey_cache_fresh_ms = 1000");
    let e = refused(&longer_fresh);
    assert!(
        e.contains("key_cache_fresh_ms (1000) exceeds key_cache_max_age_ms (900)"),
        "{e}"
    );
}

/// `capacity_tpm` and `price.reserved_per_ktpm_month` together make a model reservable; a
/// price without a capacity is an error, a capacity alone sells nothing reserved; `reserved`
/// is never a per-token tier; `priority_ttft_target_ms` defaults to a second.
#[test]
fn reserved_capacity_needs_a_capacity_and_a_price() {
    let load = |text: &str| Config::from_toml_str(text, Path::new("."));
    let config = load(GOOD).unwrap();
    assert_eq!(config.models["smollm2-135m"].reserved, None);
    assert_eq!(config.server.priority_ttft_target_ms, 1_000);
    let priced = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\", reserved_per_ktpm_month = \"12.50\" }\ncapacity_tpm = 90000",
    );
    assert_eq!(
        load(&priced).unwrap().models["smollm2-135m"].reserved,
        Some(crate::config::ReservedCapacity {
            capacity_tpm: 90_000,
            price_per_ktpm_month: "12.50".parse().unwrap(),
        })
    );
    let no_capacity = priced.replace("capacity_tpm = 90000", "");
    let e = load(&no_capacity).unwrap_err().to_string();
    assert!(e.contains("needs capacity_tpm"), "{e}");
    let capacity_only = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\" }\ncapacity_tpm = 90000",
    );
    assert_eq!(
        load(&capacity_only).unwrap().models["smollm2-135m"].reserved,
        None
    );
    let listed = GOOD.replace(
        "output_per_mtok = \"0.10\" }",
        "output_per_mtok = \"0.10\" }\nservice_tiers = [\"default\", \"reserved\"]",
    );
    let e = load(&listed).unwrap_err().to_string();
    assert!(e.contains("lists `reserved`"), "{e}");
    let target = GOOD.replace("max_n = 4", "max_n = 4\npriority_ttft_target_ms = 250");
    assert_eq!(load(&target).unwrap().server.priority_ttft_target_ms, 250);
}

#[test]
fn memory_budget_pinning_and_keep_alive() {
    let c = Config::from_toml_str(GOOD, Path::new(".")).unwrap();
    assert_eq!(c.server.model_memory_bytes, None);
    let m = &c.models["smollm2-135m"];
    assert_eq!((m.pinned, m.keep_alive), (false, None));
    let text = GOOD
        .replace("max_n = 4", "max_n = 4\n    model_memory_bytes = 1000000")
        .replace(
            r#"weights = "q8_0" }"#,
            r#"weights = "q8_0" }
    pinned = true
    keep_alive_secs = 300"#,
        );
    let c = Config::from_toml_str(&text, Path::new(".")).unwrap();
    assert_eq!(c.server.model_memory_bytes, Some(1_000_000));
    let m = &c.models["smollm2-135m"];
    assert_eq!(
        (m.pinned, m.keep_alive),
        (true, Some(std::time::Duration::from_secs(300)))
    );
    // A price change keeps the serving; a new file does not.
    let mut repriced = m.clone();
    repriced.prices = TierPrices::uniform(tollgate_metering::money::Price::default());
    assert!(m.same_serving(&repriced));
    let mut moved = m.clone();
    moved.source = Some(ModelSource::Path("other.gguf".into()));
    assert!(!m.same_serving(&moved));
    let http = GOOD.replace(
        r#"urls = ["http://w1:8081"] }"#,
        r#"urls = ["http://w1:8081"] }
    keep_alive_secs = 5"#,
    );
    assert!(
        refused(&http).contains("apply to local models"),
        "{}",
        refused(&http)
    );
}

const ADAPTERS: &str = r#"
    [models.base]
    source = { path = "models/x.gguf" }
    backend = { type = "local" }
    price = { input_per_mtok = "0.05", output_per_mtok = "0.10" }
    service_tiers = ["default", "batch"]
    [[models.base.adapters]]
    name = "pirate"
    source = { path = "adapters/pirate" }
    [[models.base.adapters]]
    name = "legal-v2"
    source = { path = "/srv/legal" }
    price = { input_per_mtok = "0.08", output_per_mtok = "0.20" }
"#;

/// Each adapter is a model id `<base>:<name>` on the base's backend, at the base's price
/// unless it sets its own (sold at the base's tiers only).
#[test]
fn adapters_become_model_ids_of_their_own() {
    let c = Config::from_toml_str(ADAPTERS, Path::new("/etc/tollgate")).unwrap();
    let ids: Vec<&String> = c.models.keys().collect();
    assert_eq!(ids, ["base", "base:legal-v2", "base:pirate"]);
    let base = &c.models["base"];
    assert_eq!(base.adapter, None);
    let pirate = &c.models["base:pirate"];
    assert_eq!(
        pirate.adapter,
        Some(AdapterConfig {
            base: "base".into(),
            name: "pirate".into(),
            path: Some("/etc/tollgate/adapters/pirate".into()),
        })
    );
    assert_eq!(pirate.source, base.source);
    assert_eq!(pirate.backend, base.backend);
    assert_eq!(pirate.prices, base.prices);
    assert!(!pirate.same_serving(base));
    let legal = &c.models["base:legal-v2"];
    let price = legal.prices.get(ServiceTier::Default).unwrap();
    assert_eq!(price.output_per_mtok, Decimal::from_str("0.20").unwrap());
    assert!(legal.prices.get(ServiceTier::Batch).is_some());
    assert!(legal.prices.get(ServiceTier::Flex).is_none());
}

#[test]
fn bad_adapters_are_refused() {
    let http = r#"
        [models.up]
        backend = { type = "http", urls = ["http://w1:8081"] }
        [[models.up.adapters]]
        name = "a"
        source = { path = "a" }
    "#;
    assert!(refused(http).contains("a plain OpenAI-compatible server"));
    let local_without_source = "[models.base]\nsource = { path = \"x.gguf\" }\nbackend = { type = \"local\" }\n[[models.base.adapters]]\nname = \"a\"\n";
    assert!(refused(local_without_source).contains("adapter `a`: needs a `source`"));
    let with = |adapters: &str| {
        format!(
            "[models.base]\nsource = {{ path = \"x.gguf\" }}\nbackend = {{ type = \"local\" }}\n{adapters}"
        )
    };
    let twice = with("[[models.base.adapters]]\nname = \"a\"\nsource = { path = \"a\" }\n[[models.base.adapters]]\nname = \"a\"\nsource = { path = \"b\" }\n");
    assert!(refused(&twice).contains("adapter `a` is listed twice"));
    let name = with("[[models.base.adapters]]\nname = \"a:b\"\nsource = { path = \"a\" }\n");
    assert!(refused(&name).contains("adapter name `a:b`"));
    let hub = with("[[models.base.adapters]]\nname = \"a\"\nsource = { hf_repo = \"o/r\" }\n");
    assert!(refused(&hub).contains("adapter `a`: source must be a local directory"));
    let typo =
        with("[[models.base.adapters]]\nname = \"a\"\nsource = { path = \"a\" }\nrank = 8\n");
    assert!(refused(&typo).contains("rank"));
    let clash = format!(
        "{}\n[models.\"base:a\"]\nsource = {{ path = \"y.gguf\" }}\nbackend = {{ type = \"local\" }}\n",
        with("[[models.base.adapters]]\nname = \"a\"\nsource = { path = \"a\" }\n")
    );
    let err = refused(&clash);
    assert!(
        err.contains("model `base:a`") && err.contains("both a model's and an adapter's"),
        "{err}"
    );
}

#[test]
fn a_pool_of_workers_carries_adapters_by_name_or_by_path() {
    let c = Config::from_toml_str(
        r#"
        [models.pool]
        backend = { type = "http", urls = ["http://w1:8081"], forward_customer = true }
        [[models.pool.adapters]]
        name = "own"
        [[models.pool.adapters]]
        name = "shared"
        source = { path = "/mnt/adapters/shared" }
        "#,
        Path::new("/etc/tollgate"),
    )
    .unwrap();
    let ids: Vec<&String> = c.models.keys().collect();
    assert_eq!(ids, ["pool", "pool:own", "pool:shared"]);
    let own = c.models["pool:own"].adapter.clone().unwrap();
    assert_eq!((own.base.as_str(), own.path), ("pool", None));
    let shared = c.models["pool:shared"].adapter.clone().unwrap();
    assert_eq!(shared.path, Some("/mnt/adapters/shared".into()));
    assert!(check_adapter_base("pool", Some(&c.models["pool"])).is_ok());
}

/// An adapter's price table is a model's, checked the same way: a refusal names the key at
/// fault; no table is the base model's prices; reserved capacity is the base model's alone.
#[test]
fn an_adapters_price_is_checked_naming_the_key() {
    let c = Config::from_toml_str(ADAPTERS, Path::new("/etc/tollgate")).unwrap();
    let base = &c.models["base"];
    let table = |json: &str| serde_json::from_str::<PriceTable>(json).unwrap();
    assert_eq!(adapter_prices(base, None).unwrap(), base.prices);
    let own = adapter_prices(
        base,
        Some(&table(r#"{"input_per_mtok":"1","output_per_mtok":"2"}"#)),
    )
    .unwrap();
    assert_eq!(
        own.get(ServiceTier::Default).unwrap().input_per_mtok,
        Decimal::ONE
    );
    // Sold at the base model's tiers only; `batch` at half by default.
    assert!(own.get(ServiceTier::Flex).is_none());
    assert_eq!(
        own.get(ServiceTier::Batch).unwrap().output_per_mtok,
        Decimal::ONE
    );
    for (json, field) in [
        (
            r#"{"input_per_mtok":"x","output_per_mtok":"2"}"#,
            "price.input_per_mtok",
        ),
        (
            r#"{"input_per_mtok":"1","output_per_mtok":"-2"}"#,
            "price.output_per_mtok",
        ),
        (
            r#"{"input_per_mtok":"1","output_per_mtok":"2","batch":{"input_per_mtok":"1","output_per_mtok":"2","cached_input_per_mtok":"c"}}"#,
            "price.batch.cached_input_per_mtok",
        ),
        (
            r#"{"input_per_mtok":"1","output_per_mtok":"2","reserved_per_ktpm_month":"3"}"#,
            "price.reserved_per_ktpm_month",
        ),
    ] {
        let err = adapter_prices(base, Some(&table(json))).unwrap_err();
        assert_eq!(err.field, field, "{json}: {err}");
        assert!(err.message.starts_with(field), "{json}: {err}");
    }
}
