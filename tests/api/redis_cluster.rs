//! Shared mode on a real Redis Cluster (three primaries of the test's own, slots split among
//! them): the same scenarios as on one Redis — following an answer from another instance,
//! stopping it from there, single-use tickets, the rate limit and the stream cap — now with
//! each chat's keys on whichever node owns its slot. A client that did not route by slot would
//! get `MOVED` for two keys in three.

use mangoo::config::Config;

use super::services::{OwnCluster, TestKeys};
use super::shared_state::{
    Pair, a_stop_anywhere_ends_the_answer, a_ticket_works_once_anywhere,
    followers_get_every_event_once_from_any_cut, limits_count_both_instances, pair_on,
    tight_limits,
};

async fn pair_on_cluster(cluster: &OwnCluster, adjust: impl Fn(&mut Config) + Clone) -> Pair {
    pair_on(TestKeys::on(cluster.seed_url()), move |c| {
        c.redis.cluster = true;
        adjust(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_on_another_instance_get_every_event_once_on_a_cluster() {
    let cluster = OwnCluster::start();
    followers_get_every_event_once_from_any_cut(pair_on_cluster(&cluster, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_from_another_instance_ends_the_answer_on_a_cluster() {
    let cluster = OwnCluster::start();
    a_stop_anywhere_ends_the_answer(pair_on_cluster(&cluster, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_works_once_on_any_instance_on_a_cluster() {
    let cluster = OwnCluster::start();
    a_ticket_works_once_anywhere(pair_on_cluster(&cluster, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_and_the_stream_cap_count_both_instances_on_a_cluster() {
    let cluster = OwnCluster::start();
    limits_count_both_instances(pair_on_cluster(&cluster, tight_limits).await).await;
}

/// `redis+cluster://` means the same as `cluster = true`; a cluster has no database but 0.
#[test]
fn a_cluster_url_turns_cluster_mode_on_and_refuses_another_database() {
    let config = Config::from_toml("[redis]\nurl = \"redis+cluster://cache:6379\"\n").unwrap();
    assert_eq!(
        config.redis.endpoint(),
        Some(("redis://cache:6379".to_owned(), true))
    );
    let refused = Config::from_toml("[redis]\nurl = \"rediss+cluster://cache:6379/2\"\n")
        .unwrap()
        .validate();
    let message = refused.expect_err("db 2 refused").to_string();
    assert!(message.contains("redis.url"), "{message}");
}
