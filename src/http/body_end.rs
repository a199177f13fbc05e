//! A response body that runs something exactly once when it is done: read to its end, or dropped
//! before that (the client went away, or hyper never polled an empty body). The access log writes
//! its line there; the listener counts a request as in flight until then.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};

/// What to do when the body is done; `completed` says whether it was read to its end.
pub trait OnBodyEnd: Send + 'static {
    fn body_ended(self, completed: bool);
}

pin_project_lite::pin_project! {
    pub struct BodyEnd<E: OnBodyEnd> {
        #[pin]
        inner: Body,
        on_end: Option<E>,
    }

    impl<E: OnBodyEnd> PinnedDrop for BodyEnd<E> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                on_end.body_ended(http_body::Body::is_end_stream(&*this.inner));
            }
        }
    }
}

impl<E: OnBodyEnd> BodyEnd<E> {
    pub fn wrap(inner: Body, on_end: E) -> Body {
        Body::new(Self {
            inner,
            on_end: Some(on_end),
        })
    }
}

impl<E: OnBodyEnd> http_body::Body for BodyEnd<E> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(on_end) = this.on_end.take()
        {
            on_end.body_ended(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
