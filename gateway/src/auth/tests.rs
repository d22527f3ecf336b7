use super::*;

#[tokio::test]
async fn static_keys_resolve_to_the_default_customer() {
    let a = AuthConfig::from_keys(["k1", " k2 ", ""]);
    let c = a.resolve(None, "k1").await.unwrap();
    assert_eq!(c.customer_id, DEFAULT_CUSTOMER);
    assert!(c.key_id.starts_with("key_static_"));
    assert!(a.resolve(None, "k2").await.is_ok());
    assert!(matches!(
        a.resolve(None, "k3").await,
        Err(ApiError::InvalidApiKey(_))
    ));
    assert!(a.resolve(None, "").await.is_err());
}

#[test]
fn reset_format_matches_openai() {
    assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
    assert_eq!(reset_text(Duration::from_millis(1500)), "2s");
    assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
}
