//! Cost-allocation tags: string pairs stored on each usage record, from the request's OpenAI
//! `metadata` and `user` and from its key's default tags, so a customer can split one bill by
//! team, project or end user (`group_by=tag:project`).
//!
//! Owns the limits (OpenAI's: at most 16 pairs, keys up to 64 and values up to 512
//! characters), the merge order, and the SQL that reads one tag from a stored record. It does
//! not parse requests (the gateway's api/openai/) or store anything (store/).

use std::collections::BTreeMap;

use crate::db::DbKind;

/// Tags by key, in key order (so the stored JSON is canonical).
pub type Tags = BTreeMap<String, String>;

/// Most pairs a request's `metadata` (or a key's default tags) may hold.
pub const MAX_PAIRS: usize = 16;
/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 64;
/// Longest value, in characters.
pub const MAX_VALUE_CHARS: usize = 512;
/// The tag `user` is stored under.
pub const USER_TAG: &str = "user";

/// A tag set that breaks a limit: the message names the offending key, `param` the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagError {
    pub message: String,
    pub param: String,
}

/// Checks a set of tags against the limits; `field` names it in errors (`metadata`, `tags`).
pub fn check(tags: &Tags, field: &str) -> Result<(), TagError> {
    if tags.len() > MAX_PAIRS {
        return Err(TagError {
            message: format!(
                "`{field}` has {} pairs; at most {MAX_PAIRS} are allowed",
                tags.len()
            ),
            param: field.to_string(),
        });
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > MAX_KEY_CHARS {
            return Err(TagError {
                message: format!(
                    "`{field}` key `{k}` must be 1 to {MAX_KEY_CHARS} characters long"
                ),
                param: field.to_string(),
            });
        }
        if v.chars().count() > MAX_VALUE_CHARS {
            return Err(TagError {
                message: format!(
                    "`{field}.{k}` is {} characters long; at most {MAX_VALUE_CHARS} are allowed",
                    v.chars().count()
                ),
                param: format!("{field}.{k}"),
            });
        }
    }
    Ok(())
}

/// A request's own tags: its `metadata`, and `user` under [`USER_TAG`] (a `user` field wins
/// over a `metadata.user`).
pub fn from_request(metadata: Option<&Tags>, user: Option<&str>) -> Result<Tags, TagError> {
    let mut tags = metadata.cloned().unwrap_or_default();
    check(&tags, "metadata")?;
    if let Some(user) = user {
        if user.chars().count() > MAX_VALUE_CHARS {
            return Err(TagError {
                message: format!(
                    "`user` is {} characters long; at most {MAX_VALUE_CHARS} are allowed",
                    user.chars().count()
                ),
                param: "user".into(),
            });
        }
        tags.insert(USER_TAG.into(), user.to_string());
    }
    Ok(tags)
}

/// What a record stores: the request's tags, then the key's default tags over them (the
/// operator set those for cost allocation; a client cannot move its spend elsewhere).
pub fn merged(request: Tags, key: &Tags) -> Tags {
    let mut tags = request;
    tags.extend(key.iter().map(|(k, v)| (k.clone(), v.clone())));
    tags
}

/// `k=v` (CLI) or `k:v` (query strings) → a pair. Errors name the text.
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    let split = text.split_once('=').or_else(|| text.split_once(':'));
    match split {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not a tag of the form key=value")),
    }
}

/// Stored form: canonical JSON, or `None` for no tags.
pub fn to_json(tags: &Tags) -> Option<String> {
    if tags.is_empty() {
        None
    } else {
        serde_json::to_string(tags).ok()
    }
}

/// Reads the stored form back; text that is not a JSON object of strings is an error.
pub fn from_json(text: Option<&str>) -> Result<Tags, String> {
    match text {
        None | Some("") => Ok(Tags::new()),
        Some(t) => serde_json::from_str(t).map_err(|e| format!("stored tags `{t}`: {e}")),
    }
}

/// SQL for the value of a `usage_records` row's tag whose key is bound as parameter `$param`,
/// `NULL` where the record lacks it. The key is compared as a value, never spliced into a
/// JSON path, so any characters work.
pub fn sql_value(kind: DbKind, param: usize) -> String {
    match kind {
        DbKind::Sqlite => {
            format!("(SELECT value FROM json_each(usage_records.tags) WHERE key = ${param})")
        }
        DbKind::Postgres => format!("(CAST(tags AS jsonb) ->> CAST(${param} AS TEXT))"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn limits_are_openais() {
        let sixteen: Tags = (0..16).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check(&sixteen, "metadata").is_ok());
        let mut seventeen = sixteen.clone();
        seventeen.insert("k16".into(), "v".into());
        let e = check(&seventeen, "metadata").unwrap_err();
        assert_eq!(e.param, "metadata");
        assert!(e.message.contains("17 pairs"), "{}", e.message);
        let long_key = tags(&[(&"k".repeat(65), "v")]);
        assert!(check(&long_key, "metadata").is_err());
        assert!(check(&tags(&[(&"k".repeat(64), "v")]), "metadata").is_ok());
        // Characters, not bytes.
        assert!(check(&tags(&[("k", &"é".repeat(512))]), "metadata").is_ok());
        let e = check(&tags(&[("k", &"é".repeat(513))]), "metadata").unwrap_err();
        assert_eq!(e.param, "metadata.k");
        assert!(check(&tags(&[("", "v")]), "metadata").is_err());
    }

    #[test]
    fn user_and_key_tags_merge_in_order() {
        let request = from_request(
            Some(&tags(&[("project", "mine"), ("user", "meta")])),
            Some("u-1"),
        )
        .unwrap();
        assert_eq!(request, tags(&[("project", "mine"), ("user", "u-1")]));
        let key = tags(&[("project", "alpha"), ("team", "ml")]);
        assert_eq!(
            merged(request, &key),
            tags(&[("project", "alpha"), ("team", "ml"), ("user", "u-1")])
        );
        assert!(from_request(None, Some(&"x".repeat(513))).is_err());
        assert_eq!(from_request(None, None).unwrap(), Tags::new());
    }

    #[test]
    fn stored_form_and_pairs() {
        let t = tags(&[("b", "2"), ("a", "1")]);
        assert_eq!(to_json(&t).unwrap(), r#"{"a":"1","b":"2"}"#);
        assert_eq!(from_json(to_json(&t).as_deref()).unwrap(), t);
        assert_eq!(to_json(&Tags::new()), None);
        assert_eq!(from_json(None).unwrap(), Tags::new());
        assert!(from_json(Some("[1]")).is_err());
        assert_eq!(
            parse_pair("project=a=b").unwrap(),
            ("project".into(), "a=b".into())
        );
        assert_eq!(
            parse_pair("project:x").unwrap(),
            ("project".into(), "x".into())
        );
        assert!(parse_pair("=x").is_err());
    }
}
