//! The Lua scripts of the shared log. Each runs atomically on the chat's slot and touches only
//! the chat's keys: `KEYS[1]` the answer's hash, `KEYS[2]` the owner's lease, `KEYS[3]` the log.
//!
//! Every write first asks [`OWNER`] whether the lease is still the writer's, and the writes of a
//! live answer also check that the log ends where the writer left it. That is how a Redis that
//! lost data is noticed instead of papered over: a restart without persistence or a `FLUSHALL`
//! leaves no hash and no lease ("lost"); a failover to a replica that missed the last writes
//! leaves a log that ends before the writer's last acknowledged event ("gap"). Either way the
//! producer, which still holds every event of its answer, writes the log again ([`RESEED`])
//! with the same ids, so a listener never reads past a hole.

use redis::Script;

/// `owner(fence, message_id)`: `0` the lease is the caller's — also when it lapsed while nobody
/// took the answer over (the hash still holds the caller's fence; the lease is set again: a
/// dependency outage that outlasted the lease is no reason to give the answer up); `-1` it is
/// someone else's; `-2` Redis no longer knows the answer (its hash is gone, or was made anew by
/// a claim that came to nothing while it was empty) and nobody holds a newer fence: the caller
/// still owns it. `LEASE_MS` is set by [`Scripts`].
const OWNER: &str = r"
local function owner(fence, message_id)
  local lease = redis.call('GET', KEYS[2])
  if lease == fence then return 0 end
  if lease then return -1 end
  if redis.call('HGET', KEYS[1], 'message_id') == message_id then
    local held = redis.call('HMGET', KEYS[1], 'fence', 'state')
    if held[1] ~= fence or held[2] ~= 'live' then return -1 end
    redis.call('SET', KEYS[2], fence, 'PX', LEASE_MS)
    return 0
  end
  if tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') > tonumber(fence) then return -1 end
  return -2
end
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function top_id()
  local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if top[1] == nil then return 0 end
  return tonumber(string.match(top[1][1], '^(%d+)'))
end
";

/// `{fence}`, or `{-1}` busy, `{-2}` orphaned (live but its lease lapsed). A chat whose hash
/// is gone (ended and expired, or deleted) starts its fences at Redis's clock in milliseconds,
/// above any fence it handed out before: a producer paused past its answer's end cannot be
/// mistaken for the owner of a later one.
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('HGET', KEYS[1], 'state') == 'live' then return -2 end
if redis.call('HEXISTS', KEYS[1], 'fence') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'fence', t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)))
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('SET', KEYS[2], fence, 'PX', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'claimed', 'stop', '0')
redis.call('HDEL', KEYS[1], 'message_id', 'first_id', 'forgotten')
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return fence
";

/// ARGV: fence, log expiry (`0`: leave it; the first batch sets it), message id, the id the log
/// should end with (`0`: empty), the answer's first event id when this batch opens it (`0`: it is
/// open), then `(id, field, value)` per event. Returns `0` written, `2` already there (a repeat
/// whose reply was lost), each `+1` when a stop is asked for; `-1` fenced, `-2` lost, `-3` the
/// log does not end where it should.
///
/// The first batch opens the answer (the claimed hash becomes live, with its message and first
/// id) in the same call that logs the answer's first event: a stream start pays no round trip of
/// its own for opening.
const APPEND: &str = r"
local owned = owner(ARGV[1], ARGV[3])
if owned ~= 0 then return owned end
local top = top_id()
local outcome = 0
if ARGV[5] ~= '0' then
  redis.call('HSET', KEYS[1], 'state', 'live', 'message_id', ARGV[3], 'first_id', ARGV[5])
end
if top ~= tonumber(ARGV[4]) then
  if top ~= tonumber(ARGV[#ARGV - 2]) then return -3 end
  outcome = 2
else
  for i = 6, #ARGV, 3 do
    redis.call('XADD', KEYS[3], ARGV[i] .. '-0', ARGV[i + 1], ARGV[i + 2])
  end
  if ARGV[2] ~= '0' then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
end
if redis.call('HGET', KEYS[1], 'stop') == '1' then return outcome + 1 end
return outcome
";

/// ARGV: fence, lease TTL, message id, the id the log should end with; `KEYS[4]` the answer's
/// listeners elsewhere. `{code, listeners}`: code `0`, `1` stop asked, `-1` fenced, `-2` lost,
/// `-3` the log does not end where it should; listeners, those whose presence has not expired
/// (also left in the hash, for operators).
const RENEW: &str = r"
local owned = owner(ARGV[1], ARGV[3])
if owned ~= 0 then return {owned, 0} end
if top_id() ~= tonumber(ARGV[4]) then return {-3, 0} end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', redis_now_ms())
local listeners = redis.call('ZCARD', KEYS[4])
redis.call('HSET', KEYS[1], 'remote_listeners', listeners)
if redis.call('HGET', KEYS[1], 'stop') == '1' then return {1, listeners} end
return {0, listeners}
";

/// A listener on another instance is there: `KEYS[1]` the answer's listeners, ARGV the
/// presence's TTL (ms), the listener's id, the set's expiry (ms).
const PRESENT: &str = r"
redis.call('ZADD', KEYS[1], redis_now_ms() + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
";

/// Writes a live answer's log anew, from its producer's own copy of the events: ARGV fence,
/// lease TTL, expiry of the log and the hash, message id, first event id, then `(id, field,
/// value)` per event. The answer, its lease and its log are as they were before Redis lost
/// them. `0`, or `-1` fenced.
const RESEED: &str = r"
if owner(ARGV[1], ARGV[4]) == -1 then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'live', 'fence', ARGV[1], 'message_id', ARGV[4],
           'first_id', ARGV[5])
redis.call('HSETNX', KEYS[1], 'stop', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[3])
for i = 6, #ARGV, 3 do
  redis.call('XADD', KEYS[3], ARGV[i] .. '-0', ARGV[i + 1], ARGV[i + 2])
end
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 0
";

/// ARGV: fence, how long the log and the hash stay (ms), then `(id, field, value)` per terminal
/// event to append. Marks the answer done and drops the lease; the log and the hash stay for
/// listeners reading the end, unless the chat was deleted meanwhile ([`FORGET`]): then they go
/// at once.
const CLOSE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
for i = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[3], ARGV[i] .. '-0', ARGV[i + 1], ARGV[i + 2])
end
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[1], 'forgotten') == '1' then
  redis.call('DEL', KEYS[1], KEYS[3])
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'done')
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'done')
return 0
";

/// The chat was deleted: its keys go. An answer that still holds its lease (it was just asked to
/// stop) is marked, and its close removes them. `KEYS[4]` the answer's listeners. `1` gone, `0`
/// left to the producer.
const FORGET: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[1], 'forgotten', '1')
  redis.call('PEXPIRE', KEYS[4], ARGV[1])
  return 0
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
return 1
";

/// `0` nothing running, `1` asked to stop, `2` orphaned.
const STOP: &str = r"
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'live' and state ~= 'claimed' then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 2 end
redis.call('HSET', KEYS[1], 'stop', '1')
return 1
";

/// `{fence, message_id, first_id}` when the lease lapsed on a live answer (now ours), else `{}`.
const TAKE_OVER: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
if redis.call('HGET', KEYS[1], 'state') ~= 'live' then return {} end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('SET', KEYS[2], fence, 'PX', ARGV[1])
return {tostring(fence), redis.call('HGET', KEYS[1], 'message_id'),
        redis.call('HGET', KEYS[1], 'first_id')}
";

/// The scripts, hashed once (each call sends only the hash; Redis loads a script it does not
/// know — after a restart, say — from the text the first time).
pub(super) struct Scripts {
    pub claim: Script,
    pub append: Script,
    pub renew: Script,
    pub present: Script,
    pub reseed: Script,
    pub close: Script,
    pub release: Script,
    pub stop: Script,
    pub take_over: Script,
    pub forget: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        let lease_ms = super::millis(super::LEASE_TTL);
        let owning =
            |body: &str| Script::new(&format!("local LEASE_MS = {lease_ms}\n{OWNER}{body}"));
        Self {
            claim: Script::new(CLAIM),
            append: owning(APPEND),
            renew: owning(RENEW),
            present: owning(PRESENT),
            reseed: owning(RESEED),
            close: Script::new(CLOSE),
            release: Script::new(RELEASE),
            stop: Script::new(STOP),
            take_over: Script::new(TAKE_OVER),
            forget: Script::new(FORGET),
        }
    }
}
