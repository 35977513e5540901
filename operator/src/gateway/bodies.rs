//! The bodies the gateway streams: the app's request on its way upstream, cut at the size
//! limit ([`Capped`]), and the upstream's answer on its way back, the key redacted
//! ([`Redacting`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::{Call, audit};
use crate::providers::gateway::forward::Redactor;

/// The app's request body on its way upstream, at most `left` more bytes of it. A frame past
/// the limit fails the upstream request (the gateway answers 413) and hands the rest of the
/// body back through `overflow`, so that the refusal can drain it and the app's connection
/// survives (see `drained`).
pub(super) struct Capped {
    inner: Option<Incoming>,
    left: u64,
    overflow: Arc<Mutex<Option<Incoming>>>,
}

impl Capped {
    pub(super) fn new(inner: Incoming, limit: u64) -> (Self, Arc<Mutex<Option<Incoming>>>) {
        let overflow = Arc::new(Mutex::new(None));
        (
            Self {
                inner: Some(inner),
                left: limit,
                overflow: Arc::clone(&overflow),
            },
            overflow,
        )
    }
}

/// A request body past the provider's `maxRequestBytes`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the provider's guardrails.maxRequestBytes")]
pub(super) struct TooLarge;

/// Whether the upstream request failed because its body was cut at the size limit.
pub(super) fn cut_at_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<TooLarge>() {
            return true;
        }
        next = e.source();
    }
    false
}

impl Body for Capped {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > this.left {
                    if let (Some(rest), Ok(mut slot)) = (this.inner.take(), this.overflow.lock()) {
                        *slot = Some(rest);
                    }
                    return Poll::Ready(Some(Err(Box::new(TooLarge))));
                }
                this.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// What the audit record of a forwarded call needs once its answer has streamed.
struct Audit {
    call: Call,
    status: u16,
    started: Instant,
}

/// The upstream's answer on its way to the app: streamed frame by frame, the key redacted,
/// counted, and audited when it ends (or the app goes away).
pub(super) struct Redacting {
    inner: Incoming,
    redactor: Redactor,
    finished: bool,
    bytes: u64,
    audit: Option<Audit>,
}

impl Redacting {
    /// `inner` redacted by `redactor`; `call` is audited with the upstream's `status` when the
    /// answer ends.
    pub(super) fn new(
        inner: Incoming,
        redactor: Redactor,
        call: Call,
        status: u16,
        started: Instant,
    ) -> Self {
        Self {
            inner,
            redactor,
            finished: false,
            bytes: 0,
            audit: Some(Audit {
                call,
                status,
                started,
            }),
        }
    }
}

impl Body for Redacting {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    this.bytes += data.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(this.redactor.push(data)))))
                }
                // Trailers are not forwarded (they could carry what headers may not).
                Err(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::new())))),
            },
            Poll::Ready(Some(Err(e))) => {
                this.finished = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finished = true;
                let tail = this.redactor.finish();
                if tail.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(tail))))
                }
            }
        }
    }
}

impl Drop for Redacting {
    fn drop(&mut self) {
        if let Some(a) = self.audit.take() {
            let outcome = if self.finished {
                "forwarded"
            } else {
                "forwarded_incomplete"
            };
            audit(
                &a.call,
                outcome,
                "",
                a.status,
                self.bytes,
                self.redactor.redacted,
                a.started,
            );
        }
    }
}
