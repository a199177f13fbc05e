//! Stream tickets: single-use, short-lived stand-ins for a token in a URL. EventSource cannot
//! send headers, so its token would sit in the URL where proxies log it; a ticket is worth one
//! stream for 60 seconds and nothing after.
//!
//! [`Tickets`] is the seam: [`TicketBook`] keeps them in this process; with shared state
//! (`shared::tickets`) they live in Redis, so a ticket issued by one instance is redeemed — once
//! — by any.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::auth::UserId;

pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Outstanding tickets kept at most: a flood of unused tickets cannot grow memory without end.
const MAX_TICKETS: usize = 100_000;

/// The ticket store could not answer (a shared one: its server is unreachable).
#[derive(Debug, thiserror::Error)]
#[error("stream tickets are unavailable: {0}")]
pub struct TicketError(pub String);

#[async_trait::async_trait]
pub trait Tickets: Send + Sync + 'static {
    /// A new ticket for `user`, or `None` when too many are outstanding.
    async fn issue(&self, user: &UserId) -> Result<Option<String>, TicketError>;
    /// The ticket's user, once: a redeemed or expired ticket is gone.
    async fn redeem(&self, ticket: &str) -> Result<Option<UserId>, TicketError>;
}

/// A fresh ticket: 256 random bits, URL-safe.
pub fn new_ticket() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The in-process ticket store.
#[derive(Default)]
pub struct TicketBook {
    tickets: Mutex<HashMap<String, (UserId, Instant)>>,
}

#[async_trait::async_trait]
impl Tickets for TicketBook {
    async fn issue(&self, user: &UserId) -> Result<Option<String>, TicketError> {
        let now = Instant::now();
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        if tickets.len() >= MAX_TICKETS {
            tickets.retain(|_, (_, expires)| *expires > now);
            if tickets.len() >= MAX_TICKETS {
                return Ok(None);
            }
        }
        let ticket = new_ticket();
        tickets.insert(ticket.clone(), (user.clone(), now + TICKET_TTL));
        Ok(Some(ticket))
    }

    async fn redeem(&self, ticket: &str) -> Result<Option<UserId>, TicketError> {
        let removed = self
            .tickets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ticket);
        Ok(removed.and_then(|(user, expires)| (expires > Instant::now()).then_some(user)))
    }
}
