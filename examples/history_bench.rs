//! What the chat page's reads cost on a store with many chats: the newest page of a long chat,
//! an older page, the chat list, and full-text search, on SQLite and (when a URL is given)
//! PostgreSQL, through the same `ChatStore` calls the server makes.
//!
//! Run with: cargo run --release --example history_bench -- [USERS] [CHATS_PER_USER] [TURNS]
//! (PostgreSQL: MANGOO_BENCH_PG=postgres://127.0.0.1/test; the bench makes and drops its own
//! database there.)

use std::sync::Arc;
use std::time::Instant;

use mangoo::config::DatabaseConfig;
use mangoo::store::{
    ChatStore, FinishedTurn, MessageStatus, NewTurn, SearchTerms, StorageQuota, connect,
};

const WORDS: &[&str] = &[
    "lisbon", "tram", "budget", "rust", "borrow", "checker", "postgres", "index", "garden",
    "tomato", "invoice", "march", "python", "list", "merge", "sorted", "weekend", "museum",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let users = args.next().transpose()?.unwrap_or(20);
    let chats = args.next().transpose()?.unwrap_or(50);
    let turns = args.next().transpose()?.unwrap_or(10);
    println!("{users} users × {chats} chats × {turns} turns (+ one chat of 500 turns)");

    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    run("SQLite", &sqlite, users, chats, turns).await?;

    if let Ok(base) = std::env::var("MANGOO_BENCH_PG") {
        let name = format!("mangoo_bench_{}", std::process::id());
        let admin = sqlx::PgPool::connect(&base).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        let url = format!(
            "{}/{name}",
            base.rsplit_once('/').map_or(&*base, |(b, _)| b)
        );
        let result = run("PostgreSQL", &url, users, chats, turns).await;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        result?;
    }
    Ok(())
}

async fn run(
    name: &str,
    url: &str,
    users: usize,
    chats: usize,
    turns: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = DatabaseConfig {
        url: url.to_owned(),
        ..DatabaseConfig::default()
    };
    let store = connect(&config).await?;
    let started = Instant::now();
    for user in 0..users {
        for chat in 0..chats {
            write_chat(
                &store,
                &format!("u{user}"),
                &format!("c{user}-{chat}"),
                turns,
            )
            .await?;
        }
    }
    write_chat(&store, "u0", "long", 500).await?;
    let messages = (users * chats * turns + 500) * 2;
    println!(
        "\n{name}: wrote {messages} messages in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    time(
        "newest 60 messages of a 1,000-message chat",
        200,
        || async { store.messages_before("long", None, 61).await.map(drop) },
    )
    .await?;
    time("60 messages before the middle of it", 200, || async {
        store.messages_before("long", Some(500), 61).await.map(drop)
    })
    .await?;
    time("chat list, first page of 30", 200, || async {
        store.list_chats("u1", 31, None).await.map(drop)
    })
    .await?;
    for query in ["lisbon", "tram budget", "gard", "nomatchatall"] {
        let terms = SearchTerms::parse(query).expect("words");
        let hits = store.search_chats("u1", &terms, 31, None).await?.len();
        time(
            &format!("search \"{query}\" ({hits} chats)"),
            100,
            || async { store.search_chats("u1", &terms, 31, None).await.map(drop) },
        )
        .await?;
    }
    store.close().await;
    Ok(())
}

async fn write_chat(
    store: &Arc<dyn ChatStore>,
    user: &str,
    chat_id: &str,
    turns: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    for n in 0..turns {
        let word = |k: usize| WORDS[(chat_id.len() * 7 + n * 3 + k) % WORDS.len()];
        let turn = NewTurn {
            chat_id: chat_id.to_owned(),
            user_id: user.to_owned(),
            new_chat: n == 0,
            bot_id: "bot".into(),
            user_message_id: format!("q-{chat_id}-{n}"),
            assistant_message_id: format!("a-{chat_id}-{n}"),
            message: format!("Tell me about {} and {} please", word(0), word(1)),
            earlier: Vec::new(),
            quota: StorageQuota::NONE,
        };
        store.begin_turn(&turn).await?;
        let answer = format!(
            "Here is a long answer about {} with {} and {}. {}",
            word(2),
            word(3),
            word(4),
            "Some more text to make it an ordinary length. ".repeat(8)
        );
        store
            .finish_turn(FinishedTurn {
                chat_id: chat_id.to_owned(),
                assistant_message_id: turn.assistant_message_id.clone(),
                content: answer.clone(),
                chunks: vec![answer.into()],
                status: MessageStatus::Complete,
                error_code: None,
                error_message: None,
                error_retryable: None,
                provider: None,
                model: None,
                usage: None,
                last_event_id: 0,
                measures: Default::default(),
            })
            .await?;
    }
    Ok(())
}

/// Median and 95th percentile of `runs` calls.
async fn time<F, Fut>(label: &str, runs: usize, call: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), mangoo::store::StoreError>>,
{
    let mut took = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        call().await?;
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    println!(
        "  {label:<52} median {:>6.2} ms   p95 {:>6.2} ms",
        took[runs / 2],
        took[runs * 95 / 100]
    );
    Ok(())
}
