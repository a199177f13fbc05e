//! Stream tickets: single-use, short-lived stand-ins for a token in a URL. EventSource cannot
//! send headers, so its token would sit in the URL where proxies log it; a ticket is worth one
//! stream for 60 seconds and nothing after.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::auth::UserId;

pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Outstanding tickets kept at most: a flood of unused tickets cannot grow memory without end.
const MAX_TICKETS: usize = 100_000;

#[derive(Default)]
pub struct TicketBook {
    tickets: Mutex<HashMap<String, (UserId, Instant)>>,
}

impl TicketBook {
    /// A new ticket for `user`, or `None` when too many are outstanding.
    pub fn issue(&self, user: &UserId) -> Option<String> {
        let now = Instant::now();
        let mut tickets = self.tickets.lock().expect("tickets lock");
        if tickets.len() >= MAX_TICKETS {
            tickets.retain(|_, (_, expires)| *expires > now);
            if tickets.len() >= MAX_TICKETS {
                return None;
            }
        }
        let bytes: [u8; 32] = rand::random();
        let ticket = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        tickets.insert(ticket.clone(), (user.clone(), now + TICKET_TTL));
        Some(ticket)
    }

    /// The ticket's user, once: a redeemed or expired ticket is gone.
    pub fn redeem(&self, ticket: &str) -> Option<UserId> {
        let (user, expires) = self.tickets.lock().expect("tickets lock").remove(ticket)?;
        (expires > Instant::now()).then_some(user)
    }
}
