use super::*;

/// A record's JSON, as the admin API and the CLI's JSONL export write it.
fn record_json(r: &UsageRecord) -> Value {
    serde_json::to_value(views::RecordView::from(r)).unwrap()
}

/// Prices are exact decimals that keep the scale they were written with: a record exports
/// the strings it was stored as, in JSON and CSV alike (the cached price falling back to the
/// input price on records older than it), and a stored row parses back to the same.
#[test]
fn exported_prices_are_the_stored_strings() {
    let price = |s: &str| s.parse::<Decimal>().unwrap();
    let mut r = UsageRecord {
        input_price_per_mtok: price("0.10"),
        output_price_per_mtok: price("2.500"),
        finish_reason: Some(crate::kinds::FinishReason::ToolCalls),
        ..UsageRecord::default()
    };
    let j = record_json(&r);
    assert_eq!(
        (
            &j["input_price_per_mtok"],
            &j["output_price_per_mtok"],
            &j["cached_input_price_per_mtok"],
            &j["finish_reason"],
        ),
        (
            &json!("0.10"),
            &json!("2.500"),
            &json!("0.10"),
            &json!("tool_calls")
        )
    );
    let cell = |r: &UsageRecord, name: &str| {
        let i = RECORD_COLUMNS.iter().position(|c| *c == name).unwrap();
        record_cells(r)[i].clone()
    };
    assert_eq!(
        [
            cell(&r, "input_price_per_mtok"),
            cell(&r, "output_price_per_mtok"),
            cell(&r, "cached_input_price_per_mtok"),
            cell(&r, "finish_reason"),
        ],
        ["0.10", "2.500", "0.10", "tool_calls"]
    );
    r.cached_input_price_per_mtok = Some(price("0.0250"));
    r.finish_reason = None;
    assert_eq!(record_json(&r)["cached_input_price_per_mtok"], "0.0250");
    assert_eq!(record_json(&r)["finish_reason"], Value::Null);
    assert_eq!(cell(&r, "cached_input_price_per_mtok"), "0.0250");
    assert_eq!(cell(&r, "finish_reason"), "");
    // The spool's JSON form reads back as written.
    let back: UsageRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.output_price_per_mtok.to_string(), "2.500");
}

/// A record's prediction tokens, their unit price and their part of the cost are exported
/// in JSON and CSV alike (the output price on records older than predictions), and the
/// spool's form reads back.
#[test]
fn exported_records_carry_their_prediction_tokens() {
    let mut r = UsageRecord {
        output_price_per_mtok: "2.5".parse().unwrap(),
        ..UsageRecord::default()
    };
    assert_eq!(record_json(&r)["rejected_prediction_price_per_mtok"], "2.5");
    r.prediction = crate::store::PredictionTokens {
        accepted: 7,
        rejected: 3,
        price_per_mtok: Some("1.250".parse().unwrap()),
        cost_nano_usd: 3_750,
    };
    let (j, cells) = (record_json(&r), record_cells(&r));
    let expected = ["7", "3", "1.250", "0.000003750"];
    for (i, name) in RECORD_COLUMNS.iter().enumerate().skip(23).take(4) {
        let json = j[name].as_str().map_or(j[name].to_string(), str::to_string);
        assert_eq!([json.as_str(), &cells[i]], [expected[i - 23]; 2], "{name}");
    }
    let back: UsageRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

/// A record of a batch's line names its batch in JSONL and CSV alike (empty for other
/// records).
#[test]
fn exported_records_carry_their_batch_id() {
    let mut r = UsageRecord::default();
    let i = RECORD_COLUMNS
        .iter()
        .position(|c| *c == "batch_id")
        .unwrap();
    assert_eq!(record_json(&r)["batch_id"], Value::Null);
    assert_eq!(record_cells(&r)[i], "");
    r.batch_id = Some("batch_0123".into());
    assert_eq!(record_json(&r)["batch_id"], "batch_0123");
    assert_eq!(record_cells(&r)[i], "batch_0123");
    assert_eq!(record_cells(&r).len(), RECORD_COLUMNS.len());
}

/// A request to an adapter's model id exports its base model and adapter (the CSV's last
/// two columns, empty for other records) beside the model id requested.
#[test]
fn exported_records_carry_their_adapter() {
    let mut r = UsageRecord::default();
    assert_eq!(
        RECORD_COLUMNS[RECORD_COLUMNS.len() - 2..],
        ["base_model", "adapter"]
    );
    assert_eq!(record_json(&r)["adapter"], Value::Null);
    assert_eq!(record_json(&r)["base_model"], Value::Null);
    assert_eq!(record_cells(&r)[RECORD_COLUMNS.len() - 2..], ["", ""]);
    r.model = "base:pirate".into();
    r.base_model = Some("base".into());
    r.adapter = Some("pirate".into());
    assert_eq!(record_json(&r)["model"], "base:pirate");
    assert_eq!(record_json(&r)["base_model"], "base");
    assert_eq!(record_json(&r)["adapter"], "pirate");
    assert_eq!(
        record_cells(&r)[RECORD_COLUMNS.len() - 2..],
        ["base", "pirate"]
    );
    let back: UsageRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

/// Every record export names the tier the record was served at: JSONL and CSV alike.
#[test]
fn exported_records_carry_their_service_tier() {
    let r = UsageRecord {
        service_tier: crate::kinds::ServiceTier::Priority,
        ..UsageRecord::default()
    };
    assert_eq!(record_json(&r)["service_tier"], "priority");
    let i = RECORD_COLUMNS
        .iter()
        .position(|c| *c == "service_tier")
        .unwrap();
    assert_eq!(record_cells(&r)[i], "priority");
    assert_eq!(record_cells(&r).len(), RECORD_COLUMNS.len());
    let row = UsageRow {
        service_tier: Some(crate::kinds::ServiceTier::Flex),
        requests: 1,
        ..UsageRow::default()
    };
    let cols = usage_columns(&parse_group_by("service_tier").unwrap());
    assert_eq!(cols[0], "service_tier");
    assert_eq!(usage_row_json(&row, &cols)["service_tier"], "flex");
    assert!(usage_csv(&[row], &cols).unwrap().contains("\nflex,1,"));
}

#[test]
fn times_and_periods_parse() {
    assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000_000);
    assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1_000_000);
    assert_eq!(parse_time("1970-01-01T01:00:01+01:00").unwrap(), 1_000_000);
    assert!(parse_time("yesterday").unwrap_err().contains("yesterday"));
    let (s, e) = parse_period("2026-02").unwrap();
    assert_eq!(rfc3339(s), "2026-02-01T00:00:00.000000Z");
    assert_eq!(rfc3339(e), "2026-03-01T00:00:00.000000Z");
    let (_, e) = parse_period("2026-12").unwrap();
    assert_eq!(rfc3339(e), "2027-01-01T00:00:00.000000Z");
    assert!(parse_period("2026-13").is_err());
    assert!(parse_period("2026").is_err());
}

#[test]
fn group_by_names_and_columns() {
    let g = parse_group_by("model, day,model").unwrap();
    assert_eq!(g, vec![GroupBy::Model, GroupBy::Day]);
    assert_eq!(
        usage_columns(&g),
        [
            "model",
            "day",
            "requests",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "cached_input_tokens"
        ]
    );
    assert!(parse_group_by("project").unwrap_err().contains("project"));
    let g = parse_group_by("tag:project,model").unwrap();
    assert_eq!(g, vec![GroupBy::Tag("project".into()), GroupBy::Model]);
    assert_eq!(usage_columns(&g)[0], "tag:project");
    assert!(parse_group_by("tag:").is_err());
    assert!(parse_group_by("tag:a,tag:b").is_err());
    assert_eq!(
        parse_tag_filter("project:alpha").unwrap(),
        ("project".into(), "alpha".into())
    );
}

#[test]
fn csv_has_header_and_exact_money() {
    let row = UsageRow {
        model: Some("m,1".into()),
        requests: 2,
        input_tokens: 10,
        output_tokens: 5,
        cost_nano_usd: 1250,
        cached_input_tokens: 4,
        ..UsageRow::default()
    };
    let cols = usage_columns(&[GroupBy::Model]);
    let text = usage_csv(std::slice::from_ref(&row), &cols).unwrap();
    assert_eq!(
        text,
        "model,requests,input_tokens,output_tokens,cost_usd,cached_input_tokens\n\
         \"m,1\",2,10,5,0.000001250,4\n"
    );
    // One name for cached tokens in JSON too; the old one stays as a deprecated alias.
    let json = usage_row_json(&row, &cols);
    assert_eq!(json["cached_input_tokens"], 4);
    assert_eq!(json["input_cached_tokens"], 4);
}

/// A record's JSON has the export's columns, in their order (the CSV's header).
#[test]
fn a_records_json_has_the_export_columns_in_order() {
    let json = record_json(&UsageRecord::default());
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, RECORD_COLUMNS);
}

/// Each kind of invoice line carries its own fields only, in the order invoices have always
/// had them; a line split by a tag names it last.
#[test]
fn invoice_lines_keep_their_fields_and_order() {
    use views::InvoiceLine;
    let row = UsageRow {
        model: Some("m".into()),
        service_tier: Some(crate::kinds::ServiceTier::Flex),
        input_price_per_mtok: Some("0.10".into()),
        output_price_per_mtok: Some("0.20".into()),
        requests: 2,
        input_tokens: 10,
        cached_input_tokens: 4,
        output_tokens: 5,
        cost_nano_usd: 1_000,
        cached_cost_nano_usd: 100,
        prediction: crate::store::PredictionTokens {
            accepted: 0,
            rejected: 3,
            price_per_mtok: Some("0.20".parse().unwrap()),
            cost_nano_usd: 50,
        },
        ..UsageRow::default()
    };
    let json = |l: InvoiceLine| serde_json::to_string(&l).unwrap();
    assert_eq!(
        json(InvoiceLine::tokens(&row)),
        r#"{"kind":"tokens","model":"m","base_model":null,"adapter":null,"service_tier":"flex","requests":2,"input_tokens":6,"output_tokens":5,"input_price_per_mtok":"0.10","output_price_per_mtok":"0.20","amount_usd":"0.000000850"}"#
    );
    assert_eq!(
        json(
            InvoiceLine::cached_input(&row)
                .unwrap()
                .tagged("project", &row)
        ),
        r#"{"kind":"cached_input","model":"m","base_model":null,"adapter":null,"service_tier":"flex","requests":2,"cached_input_tokens":4,"cached_input_price_per_mtok":"0.10","amount_usd":"0.000000100","tag":{"key":"project","value":null}}"#
    );
    assert_eq!(
        json(InvoiceLine::rejected_prediction(&row).unwrap()),
        r#"{"kind":"rejected_prediction","model":"m","base_model":null,"adapter":null,"service_tier":"flex","requests":2,"rejected_prediction_tokens":3,"rejected_prediction_price_per_mtok":"0.20","amount_usd":"0.000000050"}"#
    );
    let (start, end) = parse_period("2026-11").unwrap();
    let reservation = Reservation {
        id: "rsv_1".into(),
        customer_id: "acme".into(),
        model: "m".into(),
        reserved_tokens_per_minute: 1_000,
        price_per_ktpm_month: "3.00".parse().unwrap(),
        starts_at: start + 15 * 86_400_000_000,
        ends_at: None,
        created_at: 0,
    };
    let (line, amount) = reservation_line(&reservation, start, end);
    assert_eq!(amount, 1_500_000_000);
    assert_eq!(
        json(line),
        r#"{"kind":"reservation","reservation_id":"rsv_1","model":"m","base_model":null,"adapter":null,"service_tier":"reserved","reserved_tokens_per_minute":1000,"price_per_ktpm_month":"3.00","active_from":"2026-11-16T00:00:00.000000Z","active_until":"2026-12-01T00:00:00.000000Z","days_active":"15","days_in_month":"30","amount_usd":"1.500000000"}"#
    );
}

/// Invoices split by one tag's value and nothing else; the error names what was asked.
#[test]
fn invoices_group_by_a_tag_only() {
    assert_eq!(parse_invoice_group("tag:project").unwrap(), "project");
    assert!(parse_invoice_group("tag:").unwrap_err().contains("`tag:`"));
    assert!(parse_invoice_group("model")
        .unwrap_err()
        .contains("`model`"));
}
