#!/usr/bin/env node
/**
 * `npx cdk synth` / `npx cdk deploy`. Settings come from context (`-c key=value`):
 *   region        default us-east-1 (CloudFront's WAF lives there; see docs/deploy.md)
 *   bedrockModels comma-separated model or inference-profile ids
 *   frontDoor     cloudfront (default) or restapi
 *   redis         replication-group (default) or serverless (ElastiCache Serverless for Valkey)
 * No context lookups: synth works offline, with no credentials.
 */
import { App } from 'aws-cdk-lib';

import { MangooStack } from '../lib/mangoo-stack';

const app = new App();
const context = (key: string): string | undefined => app.node.tryGetContext(key);
const frontDoor = context('frontDoor') ?? 'cloudfront';
if (frontDoor !== 'cloudfront' && frontDoor !== 'restapi') {
  throw new Error(`frontDoor must be cloudfront or restapi, not ${frontDoor}`);
}
const redis = context('redis') ?? 'replication-group';
if (redis !== 'replication-group' && redis !== 'serverless') {
  throw new Error(`redis must be replication-group or serverless, not ${redis}`);
}
const region = context('region') ?? 'us-east-1';
if (frontDoor === 'cloudfront' && region !== 'us-east-1') {
  // A web ACL for CloudFront exists only in us-east-1; this app keeps everything in one stack.
  throw new Error(
    `the CloudFront front door (and its WAF) deploys to us-east-1; use -c region=us-east-1, or -c frontDoor=restapi in ${region}`,
  );
}
new MangooStack(app, 'Mangoo', {
  env: { region },
  bedrockModels: (context('bedrockModels') ?? 'us.anthropic.claude-3-5-sonnet-20240620-v1:0')
    .split(',')
    .map((m) => m.trim())
    .filter((m) => m.length > 0),
  frontDoor,
  redis,
});
