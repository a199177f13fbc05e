/**
 * Every timeout on a stream's path, in one place, with the relations that keep long answers
 * alive (docs/deploy.md explains each value):
 *
 *   viewer ⇄ CloudFront (origin read timeout) ⇄ ALB (idle timeout) ⇄ Mangoo (heartbeat)
 *
 * Each idle timer is reset by data; Mangoo sends a heartbeat comment on a quiet stream every
 * `heartbeatSecs`, so every idle timeout must be longer than that. On a deploy or scale-in the
 * task gets SIGTERM and drains for `drainSecs`: the target group's deregistration delay must not
 * close connections sooner, and ECS must not SIGKILL the task sooner (`stopTimeoutSecs`, at most
 * 120 s on Fargate).
 */
export interface StreamTimings {
  /** Mangoo `server.heartbeat_secs`. */
  readonly heartbeatSecs: number;
  /** Mangoo `server.drain_secs`. */
  readonly drainSecs: number;
  /** ECS container `stopTimeout` (Fargate maximum 120 s). */
  readonly stopTimeoutSecs: number;
  /** Target group deregistration delay. */
  readonly deregistrationDelaySecs: number;
  /** ALB idle timeout (the seed's 120 s). */
  readonly albIdleTimeoutSecs: number;
  /** CloudFront origin response (read) timeout: an idle timer between packets. */
  readonly originReadTimeoutSecs: number;
  /** REST API integration timeout when that front door is chosen (streaming: up to 15 min). */
  readonly restIntegrationTimeoutSecs: number;
}

export const DEFAULT_TIMINGS: StreamTimings = {
  heartbeatSecs: 15,
  drainSecs: 90,
  stopTimeoutSecs: 120,
  deregistrationDelaySecs: 100,
  albIdleTimeoutSecs: 120,
  originReadTimeoutSecs: 60,
  restIntegrationTimeoutSecs: 900,
};

/** The relations above; a violated one stops `cdk synth` with its reason. */
export function checkTimings(t: StreamTimings): void {
  const fail = (reason: string) => {
    throw new Error(`stream timings: ${reason}`);
  };
  if (t.stopTimeoutSecs > 120) fail('Fargate stopTimeout is at most 120 s');
  if (t.stopTimeoutSecs <= t.drainSecs) fail('stopTimeout must exceed drain_secs');
  if (t.deregistrationDelaySecs < t.drainSecs) fail('deregistration delay must be >= drain_secs');
  for (const [name, secs] of [
    ['ALB idle timeout', t.albIdleTimeoutSecs],
    ['CloudFront origin read timeout', t.originReadTimeoutSecs],
  ] as const) {
    if (secs <= t.heartbeatSecs) fail(`${name} must exceed the heartbeat interval`);
  }
  if (t.originReadTimeoutSecs < 60) fail('the CloudFront origin read timeout must be >= 60 s');
  if (t.restIntegrationTimeoutSecs > 900) fail('REST API streaming lasts 15 minutes at most');
}
