import * as path from 'node:path';

import {
  Duration,
  RemovalPolicy,
  Stack,
  StackProps,
  aws_apigateway as apigateway,
  aws_apigatewayv2 as apigatewayv2,
  aws_cloudfront as cloudfront,
  aws_cloudfront_origins as origins,
  aws_cloudwatch as cloudwatch,
  aws_ec2 as ec2,
  aws_ecs as ecs,
  aws_elasticache as elasticache,
  aws_elasticloadbalancingv2 as elbv2,
  aws_iam as iam,
  aws_logs as logs,
  aws_rds as rds,
  aws_secretsmanager as secretsmanager,
  aws_wafv2 as wafv2,
} from 'aws-cdk-lib';
import { Construct } from 'constructs';

import { DEFAULT_TIMINGS, StreamTimings, checkTimings } from './settings';

export interface MangooStackProps extends StackProps {
  /**
   * Bedrock model or inference-profile ids the bot may call, e.g.
   * `us.anthropic.claude-3-5-sonnet-20240620-v1:0` (newer Claude models need an inference
   * profile id; a bare model id fails with "on-demand throughput isn't supported").
   */
  readonly bedrockModels: string[];
  /** `cloudfront` (default): CloudFront + WAF → internal ALB. `restapi`: a Regional REST API
   * with response streaming over VPC link V2, for API keys and usage plans. */
  readonly frontDoor?: 'cloudfront' | 'restapi';
  readonly timings?: StreamTimings;
  /** `replication-group` (default): Valkey with a primary and a replica, cluster mode off.
   * `serverless`: ElastiCache Serverless for Valkey, which is cluster-mode only; Mangoo speaks
   * Redis Cluster to it (`rediss+cluster://`). */
  readonly redis?: 'replication-group' | 'serverless';
  /** Tasks at least / at most. */
  readonly minTasks?: number;
  readonly maxTasks?: number;
}

/**
 * Mangoo on AWS, streaming end to end: CloudFront (HTTPS only; WAF with a per-IP rate rule and
 * AWS's common and known-bad-inputs rules) → a VPC origin → an
 * internal ALB → ECS Fargate tasks (≥ 2) sharing Aurora PostgreSQL Serverless v2 and Valkey.
 * No API Gateway HTTP API anywhere: it neither streams nor takes WAF.
 */
/** Where /metrics is served in each task (`metrics.listen`), reachable from the VPC only. */
export const METRICS_PORT = 9090;
/** The RDS CA bundle in the image (the Dockerfile downloads it). */
export const RDS_CA_BUNDLE = '/etc/ssl/certs/rds-global-bundle.pem';

interface RedisAccess {
  readonly url: string;
  readonly username?: string;
  readonly password: secretsmanager.ISecret;
}

/** One AWS managed rule group; the rules named only count. */
function managedRules(name: string, priority: number, group: string, countOnly: string[]): wafv2.CfnWebACL.RuleProperty {
  return {
    name,
    priority,
    overrideAction: { none: {} },
    statement: {
      managedRuleGroupStatement: {
        vendorName: 'AWS',
        name: group,
        ruleActionOverrides: countOnly.length
          ? countOnly.map((rule) => ({ name: rule, actionToUse: { count: {} } }))
          : undefined,
      },
    },
    visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: name, sampledRequestsEnabled: true },
  };
}

export class MangooStack extends Stack {
  readonly service: ecs.FargateService;
  readonly alb: elbv2.ApplicationLoadBalancer;

  constructor(scope: Construct, id: string, props: MangooStackProps) {
    super(scope, id, props);
    const timings = props.timings ?? DEFAULT_TIMINGS;
    checkTimings(timings);

    const vpc = new ec2.Vpc(this, 'Vpc', { maxAzs: 2, natGateways: 1 });
    const tasks = new ec2.SecurityGroup(this, 'TaskSg', { vpc, description: 'Mangoo tasks' });

    const { databaseUrl, databasePassword } = this.database(vpc, tasks);
    const redis = this.redis(vpc, tasks, props.redis ?? 'replication-group');
    const jwtSecret = new secretsmanager.Secret(this, 'JwtSecret', {
      description: 'Mangoo auth.jwt_secret (HS256), shared by every task',
      generateSecretString: { passwordLength: 48, excludePunctuation: true },
    });

    // /metrics is served on a port of its own that only the VPC reaches (a Prometheus or the
    // CloudWatch agent there), never through the ALB, and even there it wants this token.
    const metricsToken = new secretsmanager.Secret(this, 'MetricsToken', {
      description: 'Mangoo metrics.bearer_token, for scrapers inside the VPC',
      generateSecretString: { passwordLength: 40, excludePunctuation: true },
    });

    const cluster = new ecs.Cluster(this, 'Cluster', { vpc, containerInsightsV2: ecs.ContainerInsights.ENABLED });
    const taskDef = new ecs.FargateTaskDefinition(this, 'Task', { cpu: 1024, memoryLimitMiB: 2048 });
    const logGroup = new logs.LogGroup(this, 'Logs', {
      retention: logs.RetentionDays.ONE_MONTH,
      removalPolicy: RemovalPolicy.DESTROY,
    });
    const bot = props.bedrockModels[0];
    taskDef.addContainer('mangoo', {
      // The repository's Dockerfile; built by `cdk deploy` (synth needs no Docker).
      image: ecs.ContainerImage.fromAsset(path.join(__dirname, '..', '..', '..', '..')),
      portMappings: [{ containerPort: 8000 }, { containerPort: METRICS_PORT }],
      // Fargate's maximum: longer than drain_secs, so Mangoo drains before it can be killed.
      stopTimeout: Duration.seconds(timings.stopTimeoutSecs),
      logging: ecs.LogDrivers.awsLogs({ logGroup, streamPrefix: 'mangoo' }),
      environment: {
        MANGOO_DATABASE_URL: databaseUrl,
        MANGOO_REDIS_URL: redis.url,
        ...(redis.username ? { MANGOO_REDIS__USERNAME: redis.username } : {}),
        MANGOO_METRICS__LISTEN: `0.0.0.0:${METRICS_PORT}`,
        MANGOO_SERVER__DRAIN_SECS: String(timings.drainSecs),
        MANGOO_SERVER__HEARTBEAT_SECS: String(timings.heartbeatSecs),
        // The ALB is in the VPC: its X-Forwarded-For names the client (CloudFront's edge).
        MANGOO_SERVER__TRUSTED_PROXIES: '["10.0.0.0/8"]',
        MANGOO_LOG__FORMAT: 'json',
        // A gauges line a minute: CloudWatch turns open_streams into a metric (see alarms).
        MANGOO_METRICS__LOG_GAUGES_SECS: '60',
        MANGOO_PROVIDERS__BEDROCK__REGION: this.region,
        MANGOO_BOTS: `[{ id = "default", provider = "bedrock", model = "${bot}" }]`,
      },
      secrets: {
        MANGOO_JWT_SECRET: ecs.Secret.fromSecretsManager(jwtSecret),
        MANGOO_DATABASE__PASSWORD: databasePassword,
        MANGOO_REDIS__PASSWORD: ecs.Secret.fromSecretsManager(redis.password),
        MANGOO_METRICS__BEARER_TOKEN: ecs.Secret.fromSecretsManager(metricsToken),
      },
    });
    taskDef.addToTaskRolePolicy(
      new iam.PolicyStatement({
        actions: ['bedrock:InvokeModelWithResponseStream'],
        resources: props.bedrockModels.flatMap((model) => this.bedrockArns(model)),
      }),
    );

    this.service = new ecs.FargateService(this, 'Service', {
      cluster,
      taskDefinition: taskDef,
      desiredCount: props.minTasks ?? 2,
      securityGroups: [tasks],
      circuitBreaker: { enable: true, rollback: true },
      minHealthyPercent: 100,
      maxHealthyPercent: 200,
    });

    this.alb = new elbv2.ApplicationLoadBalancer(this, 'Alb', {
      vpc,
      internetFacing: false,
      idleTimeout: Duration.seconds(timings.albIdleTimeoutSecs),
    });
    const listener = this.alb.addListener('Http', { port: 80, open: false });
    const targets = listener.addTargets('Mangoo', {
      port: 8000,
      protocol: elbv2.ApplicationProtocol.HTTP,
      protocolVersion: elbv2.ApplicationProtocolVersion.HTTP1,
      targets: [this.service],
      deregistrationDelay: Duration.seconds(timings.deregistrationDelaySecs),
      stickinessCookieDuration: undefined,
      healthCheck: {
        path: '/readyz',
        healthyHttpCodes: '200',
        interval: Duration.seconds(10),
        timeout: Duration.seconds(5),
        healthyThresholdCount: 2,
        unhealthyThresholdCount: 2,
      },
    });
    targets.setAttribute('stickiness.enabled', 'false');
    tasks.connections.allowFrom(this.alb, ec2.Port.tcp(8000), 'ALB to Mangoo');
    tasks.addIngressRule(ec2.Peer.ipv4(vpc.vpcCidrBlock), ec2.Port.tcp(METRICS_PORT), 'metrics scrapers in the VPC');
    // The front door reaches the internal ALB through network interfaces in this VPC (CloudFront's
    // VPC origin, or API Gateway's VPC link): nothing from outside the VPC.
    this.alb.connections.allowFrom(ec2.Peer.ipv4(vpc.vpcCidrBlock), ec2.Port.tcp(80), 'front door');

    const scaling = this.service.autoScaleTaskCount({
      minCapacity: props.minTasks ?? 2,
      maxCapacity: props.maxTasks ?? 10,
    });
    scaling.scaleOnCpuUtilization('Cpu', { targetUtilizationPercent: 60 });
    scaling.scaleOnRequestCount('Requests', { requestsPerTarget: 1000, targetGroup: targets });

    if ((props.frontDoor ?? 'cloudfront') === 'cloudfront') {
      this.cloudFront(timings);
    } else {
      this.restApi(vpc, timings);
    }
    this.alarms(targets, logGroup);
  }

  /** Aurora PostgreSQL Serverless v2; the URL without its password, which comes as a secret. */
  private database(vpc: ec2.IVpc, tasks: ec2.SecurityGroup) {
    const cluster = new rds.DatabaseCluster(this, 'Database', {
      engine: rds.DatabaseClusterEngine.auroraPostgres({ version: rds.AuroraPostgresEngineVersion.VER_16_6 }),
      vpc,
      writer: rds.ClusterInstance.serverlessV2('Writer'),
      readers: [rds.ClusterInstance.serverlessV2('Reader', { scaleWithWriter: true })],
      serverlessV2MinCapacity: 0.5,
      serverlessV2MaxCapacity: 8,
      defaultDatabaseName: 'mangoo',
      credentials: rds.Credentials.fromGeneratedSecret('mangoo'),
      storageEncrypted: true,
    });
    cluster.connections.allowDefaultPortFrom(tasks, 'Mangoo to PostgreSQL');
    const endpoint = cluster.clusterEndpoint;
    return {
      // verify-full: the server's certificate is checked against the RDS CA bundle (the image
      // carries it, see the Dockerfile) and must name the endpoint. `require` would accept any
      // certificate, so anyone on the path could pose as the database.
      databaseUrl:
        `postgres://mangoo@${endpoint.hostname}:${endpoint.port}/mangoo` +
        `?sslmode=verify-full&sslrootcert=${RDS_CA_BUNDLE}`,
      databasePassword: ecs.Secret.fromSecretsManager(cluster.secret!, 'password'),
    };
  }

  /**
   * Valkey over TLS with AUTH, in the private subnets, reachable from the tasks only. Either a
   * replication group with cluster mode disabled (a primary and a replica, automatic failover;
   * Mangoo reconnects to the promoted replica through the primary endpoint's name), or
   * ElastiCache Serverless (cluster mode; failover and scaling are AWS's, Mangoo routes by slot).
   * The password is a generated secret the tasks get as MANGOO_REDIS__PASSWORD, never in the URL.
   */
  private redis(vpc: ec2.IVpc, tasks: ec2.SecurityGroup, kind: 'replication-group' | 'serverless'): RedisAccess {
    const sg = new ec2.SecurityGroup(this, 'RedisSg', { vpc, description: 'Valkey' });
    sg.addIngressRule(tasks, ec2.Port.tcp(6379), 'Mangoo to Valkey');
    // ElastiCache AUTH tokens and passwords: 16-128 printable characters without @ " /.
    const password = new secretsmanager.Secret(this, 'RedisPassword', {
      description: 'Mangoo redis.password (Valkey AUTH)',
      generateSecretString: { passwordLength: 64, excludePunctuation: true },
    });
    if (kind === 'serverless') {
      // Serverless authenticates users of a user group: one user, limited to Mangoo's keys and
      // to the commands it sends (no CONFIG, FLUSHALL, KEYS or other @dangerous ones).
      const user = new elasticache.CfnUser(this, 'RedisUser', {
        engine: 'valkey',
        userId: `${this.stackName.toLowerCase()}-mangoo`,
        userName: 'mangoo',
        accessString: 'on ~mangoo:* +@all -@dangerous +info',
        authenticationMode: { Type: 'password', Passwords: [password.secretValue.unsafeUnwrap()] },
      });
      const users = new elasticache.CfnUserGroup(this, 'RedisUsers', {
        engine: 'valkey',
        userGroupId: `${this.stackName.toLowerCase()}-mangoo`,
        userIds: [user.userId],
      });
      users.addDependency(user);
      const cache = new elasticache.CfnServerlessCache(this, 'RedisServerless', {
        serverlessCacheName: `${this.stackName.toLowerCase()}-valkey`,
        description: 'Mangoo shared state',
        engine: 'valkey',
        majorEngineVersion: '8',
        securityGroupIds: [sg.securityGroupId],
        subnetIds: vpc.privateSubnets.map((s) => s.subnetId),
        userGroupId: users.userGroupId,
        // No data-storage limit: at a limit Serverless evicts keys that have a TTL, and every
        // key Mangoo relies on has one (docs/deploy.md).
      });
      cache.addDependency(users);
      return { url: `rediss+cluster://${cache.attrEndpointAddress}:${cache.attrEndpointPort}`, username: 'mangoo', password };
    }
    const subnets = new elasticache.CfnSubnetGroup(this, 'RedisSubnets', {
      description: 'Mangoo Valkey',
      subnetIds: vpc.privateSubnets.map((s) => s.subnetId),
    });
    // A full Redis must refuse writes (Mangoo answers 503), never evict: the managed default,
    // volatile-lru, deletes answer leases, stream-cap places and rate-limit state first.
    const parameters = new elasticache.CfnParameterGroup(this, 'RedisParameters', {
      cacheParameterGroupFamily: 'valkey8',
      description: 'Mangoo: noeviction',
      properties: { 'maxmemory-policy': 'noeviction' },
    });
    const group = new elasticache.CfnReplicationGroup(this, 'Redis', {
      replicationGroupDescription: 'Mangoo shared state',
      engine: 'valkey',
      engineVersion: '8.0',
      cacheNodeType: 'cache.t4g.small',
      numCacheClusters: 2,
      automaticFailoverEnabled: true,
      multiAzEnabled: true,
      transitEncryptionEnabled: true,
      atRestEncryptionEnabled: true,
      authToken: password.secretValue.unsafeUnwrap(),
      cacheParameterGroupName: parameters.ref,
      cacheSubnetGroupName: subnets.ref,
      securityGroupIds: [sg.securityGroupId],
    });
    return { url: `rediss://${group.attrPrimaryEndPointAddress}:${group.attrPrimaryEndPointPort}/0`, password };
  }

  /** The default front door: CloudFront with WAF, to the internal ALB through a VPC origin. */
  private cloudFront(timings: StreamTimings) {
    const acl = new wafv2.CfnWebACL(this, 'Waf', {
      scope: 'CLOUDFRONT',
      defaultAction: { allow: {} },
      visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: 'mangoo', sampledRequestsEnabled: true },
      rules: [
        {
          name: 'per-ip-rate',
          priority: 0,
          action: { block: {} },
          statement: { rateBasedStatement: { limit: 2000, evaluationWindowSec: 300, aggregateKeyType: 'IP' } },
          visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: 'per-ip-rate', sampledRequestsEnabled: true },
        },
        // AWS's common rules, except two that a chat product must not enforce: the 8 KB body
        // limit (a long message is normal; Mangoo bounds bodies with server.max_body_bytes) and
        // cross-site scripting in the body (people paste HTML and code into chats; the page
        // renders answers as text). Both only count.
        managedRules('aws-common', 1, 'AWSManagedRulesCommonRuleSet', ['SizeRestrictions_BODY', 'CrossSiteScripting_BODY']),
        managedRules('aws-known-bad-inputs', 2, 'AWSManagedRulesKnownBadInputsRuleSet', []),
      ],
    });
    new cloudfront.Distribution(this, 'Cdn', {
      webAclId: acl.attrArn,
      defaultBehavior: {
        origin: origins.VpcOrigin.withApplicationLoadBalancer(this.alb, {
          // A VPC origin: CloudFront reaches the internal ALB (no public address) through AWS's
          // network into this VPC, so HTTP here never crosses the internet (docs/deploy.md).
          protocolPolicy: cloudfront.OriginProtocolPolicy.HTTP_ONLY,
          // An idle timer between packets: heartbeats keep a quiet stream under it.
          readTimeout: Duration.seconds(timings.originReadTimeoutSecs),
          keepaliveTimeout: Duration.seconds(60),
        }),
        // Not redirect-to-https: a first http:// request would already carry the bearer token
        // in clear before any redirect. Plain HTTP gets 403.
        viewerProtocolPolicy: cloudfront.ViewerProtocolPolicy.HTTPS_ONLY,
        allowedMethods: cloudfront.AllowedMethods.ALLOW_ALL,
        cachePolicy: cloudfront.CachePolicy.CACHING_DISABLED,
        originRequestPolicy: cloudfront.OriginRequestPolicy.ALL_VIEWER_EXCEPT_HOST_HEADER,
        // text/event-stream must reach the browser as it is written.
        compress: false,
      },
    });
  }

  /**
   * The optional front door: a Regional REST API whose proxy integration streams
   * (`responseTransferMode: STREAM`) to the ALB over a VPC link V2, with an API key and a usage
   * plan (the seed's 100 rps / 200 burst).
   */
  private restApi(vpc: ec2.IVpc, timings: StreamTimings) {
    // VPC link V2 (an ApiGatewayV2 resource) reaches an ALB directly; V1 would need an NLB.
    const link = new apigatewayv2.CfnVpcLink(this, 'VpcLink', {
      name: 'mangoo',
      subnetIds: vpc.privateSubnets.map((s) => s.subnetId),
    });
    const api = new apigateway.CfnRestApi(this, 'Api', {
      name: 'mangoo',
      endpointConfiguration: { types: ['REGIONAL'] },
    });
    const proxy = new apigateway.CfnResource(this, 'Proxy', {
      restApiId: api.ref,
      parentId: api.attrRootResourceId,
      pathPart: '{proxy+}',
    });
    const method = new apigateway.CfnMethod(this, 'ProxyAny', {
      restApiId: api.ref,
      resourceId: proxy.ref,
      httpMethod: 'ANY',
      authorizationType: 'NONE',
      apiKeyRequired: true,
      requestParameters: { 'method.request.path.proxy': true },
      integration: {
        type: 'HTTP_PROXY',
        integrationHttpMethod: 'ANY',
        connectionType: 'VPC_LINK',
        connectionId: link.ref,
        integrationTarget: this.alb.loadBalancerArn,
        uri: `http://${this.alb.loadBalancerDnsName}/{proxy}`,
        requestParameters: { 'integration.request.path.proxy': 'method.request.path.proxy' },
        responseTransferMode: 'STREAM',
        timeoutInMillis: timings.restIntegrationTimeoutSecs * 1000,
      },
    });
    const deployment = new apigateway.CfnDeployment(this, 'ApiDeployment', { restApiId: api.ref });
    deployment.node.addDependency(method);
    const stage = new apigateway.CfnStage(this, 'ApiStage', {
      restApiId: api.ref,
      deploymentId: deployment.ref,
      stageName: 'v1',
    });
    const plan = new apigateway.CfnUsagePlan(this, 'UsagePlan', {
      apiStages: [{ apiId: api.ref, stage: stage.ref }],
      throttle: { rateLimit: 100, burstLimit: 200 },
    });
    const key = new apigateway.CfnApiKey(this, 'ApiKey', { enabled: true });
    new apigateway.CfnUsagePlanKey(this, 'UsagePlanKey', {
      keyId: key.ref,
      keyType: 'API_KEY',
      usagePlanId: plan.ref,
    });
  }

  /** Model ids as the ARNs IAM needs: foundation models, or inference profiles and the models
   * they route to. */
  private bedrockArns(model: string): string[] {
    const profile = /^(us|eu|apac|global)\./.exec(model);
    if (!profile) {
      return [`arn:${this.partition}:bedrock:${this.region}::foundation-model/${model}`];
    }
    const base = model.slice(profile[0].length);
    return [
      `arn:${this.partition}:bedrock:${this.region}:${this.account}:inference-profile/${model}`,
      `arn:${this.partition}:bedrock:*::foundation-model/${base}`,
    ];
  }

  private alarms(targets: elbv2.ApplicationTargetGroup, logGroup: logs.LogGroup) {
    const period = Duration.minutes(1);
    // Mangoo's own numbers, from its JSON logs: every failed stream logs "SSE stream error",
    // and the gauges line carries the open streams.
    const streamErrors = new logs.MetricFilter(this, 'StreamErrors', {
      logGroup,
      filterPattern: logs.FilterPattern.literal('{ $.level = "ERROR" && $.message = "SSE stream error*" }'),
      metricNamespace: 'Mangoo',
      metricName: 'StreamErrors',
      metricValue: '1',
      defaultValue: 0,
    }).metric({ statistic: 'Sum', period });
    const openStreams = new logs.MetricFilter(this, 'OpenStreams', {
      logGroup,
      filterPattern: logs.FilterPattern.literal('{ $.target = "mangoo::gauges" }'),
      metricNamespace: 'Mangoo',
      metricName: 'OpenStreams',
      metricValue: '$.open_streams',
    }).metric({ statistic: 'Sum', period });
    const alarm = (id: string, metric: cloudwatch.IMetric, threshold: number, description: string) =>
      new cloudwatch.Alarm(this, id, {
        metric,
        threshold,
        evaluationPeriods: 3,
        datapointsToAlarm: 2,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
        alarmDescription: description,
      });
    alarm('Alb5xx', this.alb.metrics.httpCodeElb(elbv2.HttpCodeElb.ELB_5XX_COUNT, { period }), 10,
      'The load balancer answers 5xx (no healthy task, or tasks failing)');
    alarm('Target5xx', targets.metrics.httpCodeTarget(elbv2.HttpCodeTarget.TARGET_5XX_COUNT, { period }), 10,
      'Mangoo answers 5xx');
    alarm('UnhealthyHosts', targets.metrics.unhealthyHostCount({ period, statistic: 'Maximum' }), 1,
      'A task fails /readyz (draining, or its database or Redis is unreachable)');
    alarm('BedrockThrottles', new cloudwatch.Metric({
      namespace: 'AWS/Bedrock',
      metricName: 'InvocationThrottles',
      statistic: 'Sum',
      period,
    }), 5, 'Bedrock throttles the answers');
    alarm('StreamErrorsAlarm', streamErrors, 20, 'Streams end in errors (see the logs: "SSE stream error")');
    alarm('OpenStreamsAlarm', openStreams, 4000, 'Many open streams across the tasks: check capacity');
  }
}
