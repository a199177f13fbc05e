/**
 * The template has the settings docs/deploy.md promises, and the relations between them hold.
 * `npm test` (scripts/test.sh runs it): compiled by tsc, run by `node --test`.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { App } from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';

import { METRICS_PORT, MangooStack, RDS_CA_BUNDLE } from '../lib/mangoo-stack';
import { DEFAULT_TIMINGS, checkTimings } from '../lib/settings';

function synth(frontDoor: 'cloudfront' | 'restapi', redis?: 'replication-group' | 'serverless'): Template {
  const app = new App();
  const stack = new MangooStack(app, `Mangoo-${frontDoor}`, {
    env: { region: 'us-east-1' },
    bedrockModels: ['us.anthropic.claude-3-5-sonnet-20240620-v1:0'],
    frontDoor,
    redis,
  });
  return Template.fromStack(stack);
}

const cdn = synth('cloudfront');
const rest = synth('restapi');
const t = DEFAULT_TIMINGS;

/** The one resource of a type, its properties. */
function only(template: Template, type: string): Record<string, any> {
  const found = Object.values(template.findResources(type));
  assert.equal(found.length, 1, `one ${type}`);
  return found[0].Properties;
}

function attribute(attributes: { Key: string; Value: string }[], key: string): string | undefined {
  return attributes.find((a) => a.Key === key)?.Value;
}

test('no API Gateway HTTP API anywhere, with either front door', () => {
  for (const template of [cdn, rest]) {
    template.resourceCountIs('AWS::ApiGatewayV2::Api', 0);
  }
});

test('CloudFront: VPC origin to the internal ALB, no caching, no compression, all viewer headers but Host, WAF', () => {
  const distribution = only(cdn, 'AWS::CloudFront::Distribution').DistributionConfig;
  const origin = distribution.Origins[0];
  assert.ok(origin.VpcOriginConfig, 'a VPC origin');
  assert.ok(origin.VpcOriginConfig.OriginReadTimeout >= 60);
  assert.ok(origin.VpcOriginConfig.OriginReadTimeout > t.heartbeatSecs);
  const behavior = distribution.DefaultCacheBehavior;
  assert.equal(behavior.Compress, false);
  // The managed CachingDisabled and AllViewerExceptHostHeader policies.
  assert.equal(behavior.CachePolicyId, '4135ea2d-6df8-44a3-9df3-4b5a84be39ad');
  assert.equal(behavior.OriginRequestPolicyId, 'b689b0a8-53d0-40ab-baf2-68738e2966ac');
  assert.ok(distribution.WebACLId, 'WAF attached');
  cdn.hasResourceProperties('AWS::ElasticLoadBalancingV2::LoadBalancer', { Scheme: 'internal' });
});

test("WAF on CloudFront carries the seed's per-IP rate rule: 2,000 per 5 minutes", () => {
  cdn.hasResourceProperties('AWS::WAFv2::WebACL', {
    Scope: 'CLOUDFRONT',
    Rules: Match.arrayWith([
      Match.objectLike({
        Action: { Block: {} },
        Statement: { RateBasedStatement: { Limit: 2000, EvaluationWindowSec: 300, AggregateKeyType: 'IP' } },
      }),
    ]),
  });
});

test('REST API option: streaming proxy over VPC link V2, 15 min, API key and the seed throttling', () => {
  rest.resourceCountIs('AWS::CloudFront::Distribution', 0);
  rest.resourceCountIs('AWS::ApiGatewayV2::VpcLink', 1);
  rest.hasResourceProperties('AWS::ApiGateway::RestApi', { EndpointConfiguration: { Types: ['REGIONAL'] } });
  rest.hasResourceProperties('AWS::ApiGateway::Method', {
    ApiKeyRequired: true,
    Integration: Match.objectLike({
      Type: 'HTTP_PROXY',
      ConnectionType: 'VPC_LINK',
      ResponseTransferMode: 'STREAM',
      TimeoutInMillis: 900000,
    }),
  });
  rest.hasResourceProperties('AWS::ApiGateway::UsagePlan', { Throttle: { RateLimit: 100, BurstLimit: 200 } });
});

test('ALB: idle timeout 120 s above the heartbeat; target group HTTP/1.1, /readyz, no stickiness, deregistration >= drain', () => {
  for (const template of [cdn, rest]) {
    const alb = only(template, 'AWS::ElasticLoadBalancingV2::LoadBalancer');
    const idle = Number(attribute(alb.LoadBalancerAttributes, 'idle_timeout.timeout_seconds'));
    assert.equal(idle, 120);
    assert.ok(idle > t.heartbeatSecs);
    const group = only(template, 'AWS::ElasticLoadBalancingV2::TargetGroup');
    assert.equal(group.ProtocolVersion, 'HTTP1');
    assert.equal(group.HealthCheckPath, '/readyz');
    assert.equal(attribute(group.TargetGroupAttributes, 'stickiness.enabled'), 'false');
    const delay = Number(attribute(group.TargetGroupAttributes, 'deregistration_delay.timeout_seconds'));
    assert.ok(delay >= t.drainSecs, `deregistration delay ${delay} >= drain ${t.drainSecs}`);
  }
});

test('ECS: the image, >= 2 tasks, stop timeout above drain, circuit breaker, CPU and request-count scaling', () => {
  const service = only(cdn, 'AWS::ECS::Service');
  assert.ok(service.DesiredCount >= 2);
  assert.deepEqual(service.DeploymentConfiguration.DeploymentCircuitBreaker, { Enable: true, Rollback: true });
  const container = only(cdn, 'AWS::ECS::TaskDefinition').ContainerDefinitions[0];
  assert.ok(container.StopTimeout <= 120);
  const env = Object.fromEntries(container.Environment.map((e: any) => [e.Name, e.Value]));
  const drain = Number(env.MANGOO_SERVER__DRAIN_SECS);
  assert.ok(container.StopTimeout > drain, `stop timeout ${container.StopTimeout} > drain ${drain}`);
  assert.equal(Number(env.MANGOO_SERVER__HEARTBEAT_SECS), t.heartbeatSecs);
  assert.equal(env.MANGOO_METRICS__LOG_GAUGES_SECS, '60', 'the open-streams metric has its source');
  assert.ok(env.MANGOO_DATABASE_URL, 'database URL');
  assert.ok(env.MANGOO_REDIS_URL, 'redis URL');
  const secrets = container.Secrets.map((s: any) => s.Name).sort();
  assert.deepEqual(secrets, [
    'MANGOO_DATABASE__PASSWORD',
    'MANGOO_JWT_SECRET',
    'MANGOO_METRICS__BEARER_TOKEN',
    'MANGOO_REDIS__PASSWORD',
  ]);
  const policies = Object.values(cdn.findResources('AWS::ApplicationAutoScaling::ScalingPolicy'))
    .map((p: any) => p.Properties.TargetTrackingScalingPolicyConfiguration.PredefinedMetricSpecification.PredefinedMetricType)
    .sort();
  assert.deepEqual(policies, ['ALBRequestCountPerTarget', 'ECSServiceAverageCPUUtilization']);
});

test('data: Aurora PostgreSQL Serverless v2, Valkey without cluster mode over TLS, the JWT secret in Secrets Manager', () => {
  cdn.hasResourceProperties('AWS::RDS::DBCluster', {
    Engine: 'aurora-postgresql',
    ServerlessV2ScalingConfiguration: Match.objectLike({ MinCapacity: 0.5 }),
  });
  cdn.hasResourceProperties('AWS::ElastiCache::ReplicationGroup', {
    Engine: 'valkey',
    TransitEncryptionEnabled: true,
    AutomaticFailoverEnabled: true,
  });
  const group = only(cdn, 'AWS::ElastiCache::ReplicationGroup');
  assert.equal(group.NumNodeGroups, undefined, 'cluster mode off: one node group');
  // The JWT secret, the database's, Valkey's AUTH token and the metrics token.
  cdn.resourceCountIs('AWS::SecretsManager::Secret', 4);
  cdn.resourceCountIs('AWS::ElastiCache::ServerlessCache', 0);
});

test('redis=serverless: ElastiCache Serverless for Valkey, reached as a Redis Cluster over TLS', () => {
  const serverless = synth('cloudfront', 'serverless');
  serverless.resourceCountIs('AWS::ElastiCache::ReplicationGroup', 0);
  const cache = only(serverless, 'AWS::ElastiCache::ServerlessCache');
  assert.equal(cache.Engine, 'valkey');
  assert.ok(cache.SecurityGroupIds.length === 1 && cache.SubnetIds, 'private, behind its security group');
  const container = only(serverless, 'AWS::ECS::TaskDefinition').ContainerDefinitions[0];
  const url = container.Environment.find((e: any) => e.Name === 'MANGOO_REDIS_URL').Value;
  assert.ok(JSON.stringify(url).startsWith('{"Fn::Join":["",["rediss+cluster://'), JSON.stringify(url));
});

test('locked down: /metrics on a VPC-only port with a token, Valkey AUTH and noeviction, PostgreSQL verify-full', () => {
  const container = only(cdn, 'AWS::ECS::TaskDefinition').ContainerDefinitions[0];
  const env = Object.fromEntries(container.Environment.map((e: any) => [e.Name, e.Value]));
  assert.equal(env.MANGOO_METRICS__LISTEN, `0.0.0.0:${METRICS_PORT}`, 'not on the port the ALB forwards to');
  const group = only(cdn, 'AWS::ElasticLoadBalancingV2::TargetGroup');
  assert.equal(group.Port, 8000);
  assert.notEqual(group.Port, METRICS_PORT);
  // The metrics port is open to the VPC's range only, never to the internet.
  const ingress = [
    ...Object.values(cdn.findResources('AWS::EC2::SecurityGroupIngress')).map((r: any) => r.Properties),
    ...Object.values(cdn.findResources('AWS::EC2::SecurityGroup')).flatMap((r: any) => r.Properties.SecurityGroupIngress ?? []),
  ].filter((rule: any) => rule.FromPort === METRICS_PORT);
  assert.equal(ingress.length, 1);
  assert.ok(ingress[0].CidrIp && JSON.stringify(ingress[0].CidrIp).includes('CidrBlock'), JSON.stringify(ingress[0]));
  const redis = only(cdn, 'AWS::ElastiCache::ReplicationGroup');
  assert.ok(JSON.stringify(redis.AuthToken).includes('resolve:secretsmanager'), 'AUTH token from Secrets Manager');
  const parameters = only(cdn, 'AWS::ElastiCache::ParameterGroup');
  assert.equal(parameters.Properties['maxmemory-policy'], 'noeviction');
  assert.ok(redis.CacheParameterGroupName, 'the parameter group is used');
  const url = JSON.stringify(env.MANGOO_DATABASE_URL);
  assert.ok(url.includes('sslmode=verify-full') && url.includes(`sslrootcert=${RDS_CA_BUNDLE}`), url);
  assert.ok(!JSON.stringify(env.MANGOO_REDIS_URL).includes('@'), 'no password in the Redis URL');
});

test('redis=serverless: a Valkey user group, the user limited to Mangoo keys and no @dangerous commands', () => {
  const serverless = synth('cloudfront', 'serverless');
  const cache = only(serverless, 'AWS::ElastiCache::ServerlessCache');
  assert.ok(cache.UserGroupId, 'authenticated users only');
  assert.equal(cache.CacheUsageLimits, undefined, 'no storage limit, at which Serverless evicts');
  const user = only(serverless, 'AWS::ElastiCache::User');
  assert.equal(user.AccessString, 'on ~mangoo:* +@all -@dangerous +info');
  assert.equal(user.AuthenticationMode.Type, 'password');
  const container = only(serverless, 'AWS::ECS::TaskDefinition').ContainerDefinitions[0];
  const env = Object.fromEntries(container.Environment.map((e: any) => [e.Name, e.Value]));
  assert.equal(env.MANGOO_REDIS__USERNAME, 'mangoo');
});

test('CloudFront: HTTPS only for viewers, the AWS managed rule groups with the body-size rule counting', () => {
  const behavior = only(cdn, 'AWS::CloudFront::Distribution').DistributionConfig.DefaultCacheBehavior;
  assert.equal(behavior.ViewerProtocolPolicy, 'https-only');
  const rules = only(cdn, 'AWS::WAFv2::WebACL').Rules;
  const groups = rules
    .filter((r: any) => r.Statement.ManagedRuleGroupStatement)
    .map((r: any) => r.Statement.ManagedRuleGroupStatement);
  const names = groups.map((g: any) => g.Name).sort();
  assert.deepEqual(names, ['AWSManagedRulesCommonRuleSet', 'AWSManagedRulesKnownBadInputsRuleSet']);
  const common = groups.find((g: any) => g.Name === 'AWSManagedRulesCommonRuleSet');
  const overrides = Object.fromEntries(common.RuleActionOverrides.map((o: any) => [o.Name, o.ActionToUse]));
  assert.deepEqual(overrides.SizeRestrictions_BODY, { Count: {} }, 'a long chat message is not blocked');
});

test('the cancel policy is the default: listeners on every task are counted', () => {
  const container = only(cdn, 'AWS::ECS::TaskDefinition').ContainerDefinitions[0];
  const names = container.Environment.map((e: any) => e.Name);
  assert.ok(!names.includes('MANGOO_STREAMS__ON_DISCONNECT'), names.join(','));
});

test('IAM: Bedrock limited to InvokeModelWithResponseStream on the configured models', () => {
  const statements = Object.values(cdn.findResources('AWS::IAM::Policy'))
    .flatMap((p: any) => p.Properties.PolicyDocument.Statement)
    .filter((s: any) => JSON.stringify(s.Action).includes('bedrock'));
  assert.equal(statements.length, 1);
  assert.equal(statements[0].Action, 'bedrock:InvokeModelWithResponseStream');
  const resources = JSON.stringify(statements[0].Resource);
  assert.ok(resources.includes('inference-profile/us.anthropic.claude-3-5-sonnet-20240620-v1:0'), resources);
  assert.ok(!resources.includes('"*"'), 'no wildcard resource');
});

test("alarms: ALB 5xx, target 5xx, unhealthy hosts, Bedrock throttles, Mangoo's stream errors and open streams", () => {
  const metrics = Object.values(cdn.findResources('AWS::CloudWatch::Alarm')).map((a: any) => a.Properties.MetricName);
  for (const metric of [
    'HTTPCode_ELB_5XX_Count',
    'HTTPCode_Target_5XX_Count',
    'UnHealthyHostCount',
    'InvocationThrottles',
    'StreamErrors',
    'OpenStreams',
  ]) {
    assert.ok(metrics.includes(metric), `${metric} in ${metrics}`);
  }
});

test('timings that would cut streams are refused at synth', () => {
  assert.throws(() => checkTimings({ ...t, deregistrationDelaySecs: t.drainSecs - 1 }), /deregistration/);
  assert.throws(() => checkTimings({ ...t, stopTimeoutSecs: t.drainSecs }), /stopTimeout/);
  assert.throws(() => checkTimings({ ...t, albIdleTimeoutSecs: t.heartbeatSecs }), /heartbeat/);
  assert.throws(() => checkTimings({ ...t, stopTimeoutSecs: 121 }), /120/);
  checkTimings(t);
});
