//! Bounded admission for the OpenAI API: at most `max_inflight_requests` requests of `/v1` are
//! served at once (from the head until the last byte of the body, streams included). One
//! beyond is answered at once with 503 `overloaded` and `Retry-After`, before the key lookup or
//! any other work, so past its capacity the gateway sheds load with fast answers instead of
//! queueing until the connection cap resets new connections. `/health`, `/metrics` and the
//! admin API are outside it: they keep answering while the API sheds.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntCounter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The API's admission slots.
#[derive(Clone)]
pub(crate) struct Shed {
    slots: Arc<Semaphore>,
    shed: IntCounter,
}

impl Shed {
    pub(crate) fn new(max_inflight: usize, shed: IntCounter) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_inflight.max(1))),
            shed,
        }
    }
}

/// How long a shed client is asked to wait: the requests in flight finish within seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// Serves the request under a slot held until its response body ends, or sheds it.
pub(crate) async fn layer(State(shed): State<Shed>, request: Request, next: Next) -> Response {
    let Ok(slot) = shed.slots.clone().try_acquire_owned() else {
        shed.shed.inc();
        return ApiError::AtCapacity {
            retry_after_secs: RETRY_AFTER_SECS,
        }
        .into_response();
    };
    next.run(request)
        .await
        .map(|body| Body::new(Held { body, _slot: slot }))
}

/// A response body that holds its request's slot until it is done or dropped.
struct Held {
    body: Body,
    _slot: OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
