//! One event of an upstream's chat or text completion stream, read into what the gateway uses
//! of it: the first choice's text, finish reason, tool-call parts and logprobs, the `usage`, the
//! `service_tier` and an `error`'s message.
//!
//! Read into typed fields that borrow the event's strings (an event is read once per streamed
//! token, and reading it as a general `serde_json::Value` took about a tenth of the gateway's
//! instructions per proxied request). An event whose fields are not of the usual types (a
//! number where text goes, a choice that is not an object, a repeated key) is read the general
//! way instead, with the same result as before this module existed: the fast reading only ever
//! takes events it reads exactly as the general one does.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use super::chat::UpstreamUsage;
use crate::backend::{LogprobEntry, ServiceTier, TokenLogprob};

/// What the gateway reads of one event.
#[derive(Debug, PartialEq)]
pub(super) struct Chunk<'a> {
    /// `error.message`: the upstream ended the stream with an error.
    pub error: Option<String>,
    /// The first of `choices`.
    pub choice: Option<Choice<'a>>,
    /// `usage`, when it is an object.
    pub usage: Option<UpstreamUsage>,
    /// `service_tier`, when it is one Tollgate knows.
    pub service_tier: Option<ServiceTier>,
}

/// What the gateway reads of a choice.
#[derive(Debug, PartialEq)]
pub(super) struct Choice<'a> {
    /// `delta.content` (chat) or `text` (completions); empty when neither is text.
    pub text: Cow<'a, str>,
    /// `finish_reason`, when it is text.
    pub finish_reason: Option<Cow<'a, str>>,
    /// `delta.tool_calls`, when it is an array.
    pub calls: Vec<Value>,
    pub logprobs: Vec<LogprobEntry>,
}

/// The event's `data`, read; `None` when it is not JSON.
pub(super) fn parse(data: &str) -> Option<Chunk<'_>> {
    if let Ok(Obj(wire)) = serde_json::from_str::<Obj<Wire<'_>>>(data) {
        return Some(wire.into_chunk());
    }
    let value = serde_json::from_str::<Value>(data).ok()?;
    Some(from_value(&value).into_owned())
}

/// An event in the shape upstreams send; any field of another type fails the whole reading
/// (and the event is read as a `Value`).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<Obj<WireChoice<'a>>>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default, borrow)]
    service_tier: Option<Text<'a>>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Obj<WireDelta<'a>>>,
    #[serde(default, borrow)]
    text: Option<Text<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<Text<'a>>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

/// A struct read from a JSON object only (serde's derived reading also takes an array of the
/// fields' values in order, which the general reading would not see as those fields).
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A string, borrowed from the event when it has no escapes (serde's own `Cow` borrows only
/// outside an `Option`).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// `usage` as an object (anything else fails the fast reading); its figures are read as
/// leniently as [`UpstreamUsage::read`] reads them.
#[derive(Deserialize)]
#[serde(transparent)]
struct WireUsage(serde_json::Map<String, Value>);

impl<'a> Wire<'a> {
    fn into_chunk(self) -> Chunk<'a> {
        let choice = self
            .choices
            .and_then(|c| c.into_iter().next())
            .map(|Obj(c)| {
                let (content, calls) = match c.delta {
                    Some(Obj(d)) => (d.content, d.tool_calls.unwrap_or_default()),
                    None => (None, Vec::new()),
                };
                Choice {
                    text: content.or(c.text).map(|t| t.0).unwrap_or_default(),
                    finish_reason: c.finish_reason.map(|f| f.0),
                    calls,
                    logprobs: c.logprobs.as_ref().map(logprobs).unwrap_or_default(),
                }
            });
        Chunk {
            error: self.error.as_ref().and_then(error_message),
            choice,
            usage: self
                .usage
                .and_then(|u| UpstreamUsage::read(&Value::Object(u.0))),
            service_tier: self.service_tier.and_then(|t| t.0.parse().ok()),
        }
    }
}

fn error_message(error: &Value) -> Option<String> {
    error["message"].as_str().map(str::to_string)
}

/// The general reading, of any JSON value.
fn from_value(chunk: &Value) -> Chunk<'_> {
    let choice = chunk["choices"].get(0).map(|c| Choice {
        text: Cow::Borrowed(
            c["delta"]["content"]
                .as_str()
                .or_else(|| c["text"].as_str())
                .unwrap_or(""),
        ),
        finish_reason: c["finish_reason"].as_str().map(Cow::Borrowed),
        calls: c["delta"]["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        logprobs: logprobs(&c["logprobs"]),
    });
    Chunk {
        error: error_message(&chunk["error"]),
        choice,
        usage: chunk.get("usage").and_then(UpstreamUsage::read),
        service_tier: chunk["service_tier"].as_str().and_then(|t| t.parse().ok()),
    }
}

impl Chunk<'_> {
    pub(super) fn into_owned(self) -> Chunk<'static> {
        Chunk {
            error: self.error,
            choice: self.choice.map(|c| Choice {
                text: Cow::Owned(c.text.into_owned()),
                finish_reason: c.finish_reason.map(|f| Cow::Owned(f.into_owned())),
                calls: c.calls,
                logprobs: c.logprobs,
            }),
            usage: self.usage,
            service_tier: self.service_tier,
        }
    }
}

/// A logprob as the gateway keeps it (`f32`, as the engine computes them); anything but a
/// number is minus infinity.
fn logprob(v: &Value) -> f32 {
    // `as` from f64 to f32 rounds to the nearest f32 (beyond its range, ±inf): the precision a
    // logprob has anyway. No integer is involved, nothing wraps; std has no checked form.
    v.as_f64().unwrap_or(f64::NEG_INFINITY) as f32
}

/// Logprob entries of a choice's `logprobs`, in the chat (`content`) or the legacy (`tokens` /
/// `token_logprobs` / `top_logprobs`) shape.
fn logprobs(lp: &Value) -> Vec<LogprobEntry> {
    let token = |v: &Value| TokenLogprob {
        token: v["token"].as_str().unwrap_or_default().to_string(),
        logprob: logprob(&v["logprob"]),
        bytes: v["bytes"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter_map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()))
                    .collect()
            })
            .unwrap_or_else(|| v["token"].as_str().unwrap_or_default().as_bytes().to_vec()),
    };
    if let Some(content) = lp["content"].as_array() {
        return content
            .iter()
            .map(|e| LogprobEntry {
                chosen: token(e),
                top: e["top_logprobs"]
                    .as_array()
                    .map(|t| t.iter().map(token).collect())
                    .unwrap_or_default(),
            })
            .collect();
    }
    let (Some(tokens), Some(values)) = (lp["tokens"].as_array(), lp["token_logprobs"].as_array())
    else {
        return Vec::new();
    };
    tokens
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (t, v))| {
            let text = t.as_str().unwrap_or_default();
            LogprobEntry {
                chosen: TokenLogprob {
                    token: text.to_string(),
                    logprob: logprob(v),
                    bytes: text.as_bytes().to_vec(),
                },
                top: lp["top_logprobs"][i]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| TokenLogprob {
                                token: k.clone(),
                                logprob: logprob(v),
                                bytes: k.as_bytes().to_vec(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
