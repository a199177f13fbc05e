//! Stream tickets in Redis: minted with `SET … NX EX 60`, redeemed with `GETDEL`, so a ticket
//! issued by one instance works exactly once on any. The key is the ticket's SHA-256, not the
//! ticket: whoever can list keys learns nothing they could redeem.

use redis::AsyncCommands;

use super::Redis;
use crate::auth::UserId;
use crate::auth::tickets::{TICKET_TTL, TicketError, Tickets, new_ticket};

pub struct RedisTickets {
    redis: Redis,
}

impl RedisTickets {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    fn key(&self, ticket: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        self.redis.key(&format!("ticket:{hex}"))
    }
}

fn unavailable(e: redis::RedisError) -> TicketError {
    TicketError(e.to_string())
}

#[async_trait::async_trait]
impl Tickets for RedisTickets {
    async fn issue(&self, user: &UserId) -> Result<Option<String>, TicketError> {
        let ticket = new_ticket();
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(TICKET_TTL.as_secs()));
        let set: Option<String> = self
            .redis
            .conn()
            .set_options(self.key(&ticket), user.as_str(), options)
            .await
            .map_err(unavailable)?;
        // NX refusing 256 fresh random bits would mean a broken random source: no ticket.
        Ok(set.map(|_| ticket))
    }

    async fn redeem(&self, ticket: &str) -> Result<Option<UserId>, TicketError> {
        let user: Option<String> = self
            .redis
            .conn()
            .get_del(self.key(ticket))
            .await
            .map_err(unavailable)?;
        Ok(user.map(UserId::from_trusted))
    }
}
