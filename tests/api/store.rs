//! One conformance suite for every [`ChatStore`]: each test below runs against SQLite (a fresh
//! file) and PostgreSQL (a fresh database on the machine's server), the atuin server's pattern.
//! SQLite commits the writes that arrive together in one transaction (group commit), so the
//! concurrency tests also check that a batch keeps every write whole and separate.

use std::sync::Arc;

use futures_util::future::join_all;
use mangoo::config::DatabaseConfig;
use mangoo::store::{
    ChatStore, EarlierMessage, FinishedTurn, MessageStatus, NewTurn, PartialAnswer, QuotaKind,
    Role, SearchTerms, StorageQuota, StoreError, TokenUsage, TurnMeasures, UsageGrouping,
    UsageQuery, UsageRow,
};

use super::services::TestDatabase;

fn turn(chat_id: &str, user: &str, new_chat: bool, n: usize) -> NewTurn {
    NewTurn {
        chat_id: chat_id.into(),
        user_id: user.into(),
        new_chat,
        bot_id: "bot".into(),
        user_message_id: format!("user-{chat_id}-{n}"),
        assistant_message_id: format!("answer-{chat_id}-{n}"),
        message: format!("question {n}"),
        earlier: Vec::new(),
        quota: StorageQuota::NONE,
    }
}

fn finished(chat_id: &str, n: usize, last_event_id: i64) -> FinishedTurn {
    FinishedTurn {
        chat_id: chat_id.into(),
        assistant_message_id: format!("answer-{chat_id}-{n}"),
        content: format!("answer {n}"),
        chunks: vec![format!("answer {n}").into()],
        status: MessageStatus::Complete,
        error_code: None,
        error_message: None,
        error_retryable: None,
        provider: Some("p".into()),
        model: Some("m".into()),
        usage: None,
        last_event_id,
        measures: TurnMeasures::default(),
    }
}

/// A fresh, empty store of one kind, and how to open it again.
pub struct Backend {
    pub store: Arc<dyn ChatStore>,
    pub config: DatabaseConfig,
    _sqlite: Option<tempfile::TempDir>,
    _postgres: Option<TestDatabase>,
}

impl Backend {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("store.db").display());
        let mut backend = Self::open(url).await;
        backend._sqlite = Some(dir);
        backend
    }

    pub async fn postgres() -> Self {
        let database = TestDatabase::create().await;
        let mut backend = Self::open(database.url.clone()).await;
        backend._postgres = Some(database);
        backend
    }

    async fn open(url: String) -> Self {
        let config = DatabaseConfig {
            url,
            ..DatabaseConfig::default()
        };
        Self {
            store: mangoo::store::connect(&config).await.unwrap(),
            config,
            _sqlite: None,
            _postgres: None,
        }
    }

    /// Another handle on the same database: a restarted process, or a second instance.
    pub async fn reopen(&self) -> Arc<dyn ChatStore> {
        mangoo::store::connect(&self.config).await.unwrap()
    }
}

/// Each test, once per backend: `store::sqlite::name` and `store::postgres::name`.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::postgres().await).await;
                }
            )*
        }
    };
}

conformance!(
    writes_arriving_together_each_stay_whole_and_a_failing_one_leaves_no_trace,
    a_closed_store_refuses_writes_but_kept_every_one_it_accepted,
    quotas_refuse_the_turn_that_would_pass_them_and_deleting_gives_room_back,
    message_pages_follow_each_other_and_recent_messages_are_the_last,
    an_answer_is_concluded_once_and_the_first_conclusion_stands,
    a_crashed_answer_keeps_its_saved_text_and_its_ids_are_never_reused,
    chat_history_is_the_owners_only_and_holds_the_last_messages,
    two_instances_racing_for_one_chat_start_exactly_one_answer,
    a_rewound_chat_loses_the_turn_and_what_follows_and_takes_a_new_one,
    a_turn_begun_or_finished_twice_is_stored_once,
    message_pages_run_backwards_from_the_newest_or_from_a_message,
    search_finds_titles_and_finished_messages_of_the_user_only,
    search_follows_renames_rewinds_and_deletes_and_pages_by_recency,
    a_regenerated_answer_keeps_the_ones_it_replaced_until_its_place_is_rewound,
    starts_arriving_together_pass_a_quota_exactly_and_a_dropped_caller_leaves_no_half_turn,
    a_new_chat_with_a_brought_history_stores_it_whole_within_the_quotas,
    the_usage_ledger_records_each_concluded_turn_once_and_outlives_its_chat,
);

/// Every concluded turn leaves one ledger row — reported tokens when the provider gave them,
/// counted ones when not, abandoned answers too — and deleting the chat does not undo it.
async fn the_usage_ledger_records_each_concluded_turn_once_and_outlives_its_chat(backend: Backend) {
    let store = backend.store;
    let everyone = |group_by| UsageQuery {
        user_id: None,
        from_ms: 0,
        to_ms: i64::MAX,
        group_by,
    };
    store
        .begin_turn(&turn("u1", "alice", true, 1))
        .await
        .unwrap();
    let mut reported = finished("u1", 1, 9);
    reported.usage = Some(TokenUsage {
        input_tokens: 100,
        output_tokens: 7,
    });
    reported.measures = TurnMeasures {
        first_token_ms: Some(40),
        duration_ms: Some(900),
        counted_input_tokens: 3,
    };
    assert!(store.finish_turn(reported.clone()).await.unwrap());
    assert!(store.finish_turn(reported).await.unwrap(), "a repeat");
    store
        .begin_turn(&turn("u1", "alice", false, 2))
        .await
        .unwrap();
    let mut counted = finished("u1", 2, 20);
    counted.chunks = vec!["a".into(), "b".into(), "c".into()];
    counted.content = "abc".into();
    counted.measures.counted_input_tokens = 25;
    store.finish_turn(counted).await.unwrap();
    store.begin_turn(&turn("u2", "bob", true, 1)).await.unwrap();
    let mut bob = finished("u2", 1, 5);
    bob.usage = Some(TokenUsage {
        input_tokens: 10,
        output_tokens: 1,
    });
    store.finish_turn(bob).await.unwrap();
    // An answer nobody concluded, found at the next start.
    store.begin_turn(&turn("u3", "bob", true, 1)).await.unwrap();
    store
        .save_partial(PartialAnswer {
            assistant_message_id: "answer-u3-1".into(),
            chunks: vec!["x".into(), "y".into()],
            reserved_event_id: 50,
        })
        .await
        .unwrap();
    store.recover_abandoned_turns().await.unwrap();

    let by_user = store.usage(everyone(UsageGrouping::User)).await.unwrap();
    let row = |key: &str, turns, input_tokens, output_tokens| UsageRow {
        key: key.into(),
        turns,
        input_tokens,
        output_tokens,
    };
    assert_eq!(
        by_user,
        [row("alice", 2, 125, 10), row("bob", 2, 10, 3)],
        "reported 100/7 once, counted 25/3; bob's 10/1 and the abandoned answer's 2 pieces"
    );
    assert!(store.delete_chat("u1", "alice").await.unwrap());
    let alice = UsageQuery {
        user_id: Some("alice"),
        ..everyone(UsageGrouping::Bot)
    };
    assert_eq!(
        store.usage(alice).await.unwrap(),
        [row("bot", 2, 125, 10)],
        "a deleted chat's tokens were still spent"
    );
    let days = store.usage(everyone(UsageGrouping::Day)).await.unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!(days[0].turns, 4);
    assert_eq!(days[0].key.len(), "2026-12-08".len());
    let before = UsageQuery {
        to_ms: 1,
        ..everyone(UsageGrouping::Day)
    };
    assert!(
        store.usage(before).await.unwrap().is_empty(),
        "the range counts"
    );
}

/// The OpenAI and AI SDK protocols bring the conversation: a new chat stores it before its
/// question, in one write with the turn, counted by the quotas, repeatable like any begin.
async fn a_new_chat_with_a_brought_history_stores_it_whole_within_the_quotas(backend: Backend) {
    let store = backend.store;
    let earlier = |texts: &[&str]| -> Vec<EarlierMessage> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| EarlierMessage {
                role: if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                },
                content: (*text).into(),
            })
            .collect()
    };
    let mut seeded = turn("seeded", "alice", true, 1);
    seeded.earlier = earlier(&["first question", "first answer", "second", "2"]);
    let begun = store.begin_turn(&seeded).await.unwrap();
    let again = store.begin_turn(&seeded).await.unwrap();
    assert_eq!(begun.last_event_id, again.last_event_id, "repeatable");
    let messages = store.list_messages("seeded", None, 10).await.unwrap();
    let texts: Vec<_> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        texts,
        [
            "first question",
            "first answer",
            "second",
            "2",
            "question 1",
            ""
        ]
    );
    let roles: Vec<_> = messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles[..4],
        [Role::User, Role::Assistant, Role::User, Role::Assistant]
    );
    assert!(
        messages[..5]
            .iter()
            .all(|m| m.status == MessageStatus::Complete)
    );
    assert_eq!(messages[5].status, MessageStatus::Streaming);
    let chat = store.get_chat("seeded").await.unwrap().unwrap();
    assert_eq!(chat.title, "first question", "titled by its first question");
    store
        .finish_turn(finished("seeded", 1, begun.last_event_id + 2))
        .await
        .unwrap();
    let next = store
        .begin_turn(&turn("seeded", "alice", false, 2))
        .await
        .unwrap();
    assert_eq!(next.last_event_id, begun.last_event_id + 2);

    // Quotas count the history: its turns, and its bytes.
    let quota = StorageQuota {
        max_chats: 10,
        max_bytes: 10_000,
        max_turns: 2,
    };
    let mut too_long = turn("too-long", "bob", true, 1);
    too_long.quota = quota;
    too_long.earlier = earlier(&["a", "b", "c", "d"]);
    assert!(matches!(
        store.begin_turn(&too_long).await,
        Err(StoreError::QuotaExceeded(QuotaKind::Turns))
    ));
    let mut too_big = turn("too-big", "bob", true, 1);
    too_big.quota = quota;
    too_big.earlier = earlier(&[&"x".repeat(9_990), "y"]);
    assert!(matches!(
        store.begin_turn(&too_big).await,
        Err(StoreError::QuotaExceeded(QuotaKind::Bytes))
    ));
    for refused in ["too-long", "too-big"] {
        assert!(
            store.get_chat(refused).await.unwrap().is_none(),
            "no trace of {refused}"
        );
    }
    let mut fits = turn("fits", "bob", true, 1);
    fits.quota = quota;
    fits.earlier = earlier(&["a", "b"]);
    store.begin_turn(&fits).await.unwrap();
    assert_eq!(
        store.list_messages("fits", None, 10).await.unwrap().len(),
        4
    );
    let mut taken = turn("fits", "mallory", true, 1);
    taken.earlier = earlier(&["a", "b"]);
    taken.user_message_id = "other-user".into();
    taken.assistant_message_id = "other-answer".into();
    assert!(
        matches!(
            store.begin_turn(&taken).await,
            Err(StoreError::ChatNotFound)
        ),
        "another user's chat id is nobody's to take"
    );
}

/// What a retry after a lost reply does: the same call again, with the same ids.
async fn a_turn_begun_or_finished_twice_is_stored_once(backend: Backend) {
    let store = backend.store;
    let first = store
        .begin_turn(&turn("twice", "alice", true, 1))
        .await
        .unwrap();
    let again = store
        .begin_turn(&turn("twice", "alice", true, 1))
        .await
        .unwrap();
    assert_eq!(first.last_event_id, again.last_event_id);
    assert_eq!(
        store.list_messages("twice", None, 10).await.unwrap().len(),
        2
    );
    assert!(
        matches!(
            store.begin_turn(&turn("twice", "mallory", true, 1)).await,
            Err(StoreError::ChatNotFound)
        ),
        "another user's repeat finds nothing of Alice's"
    );

    assert!(store.finish_turn(finished("twice", 1, 9)).await.unwrap());
    assert!(
        store.finish_turn(finished("twice", 1, 9)).await.unwrap(),
        "the same outcome again"
    );
    let mut other = finished("twice", 1, 9);
    other.content = "something else".into();
    other.status = MessageStatus::Error;
    assert!(
        !store.finish_turn(other).await.unwrap(),
        "a different outcome does not replace the first"
    );
    let messages = store.list_messages("twice", None, 10).await.unwrap();
    assert_eq!(messages[1].content, "answer 1");
    assert_eq!(messages[1].status, MessageStatus::Complete);

    let second = store
        .begin_turn(&turn("twice", "alice", false, 2))
        .await
        .unwrap();
    assert_eq!(second.last_event_id, 9);
    let repeated = store
        .begin_turn(&turn("twice", "alice", false, 2))
        .await
        .unwrap();
    assert_eq!(repeated.last_event_id, 9);
    assert_eq!(
        store.list_messages("twice", None, 10).await.unwrap().len(),
        4
    );
}

async fn a_rewound_chat_loses_the_turn_and_what_follows_and_takes_a_new_one(backend: Backend) {
    let store = backend.store;
    store
        .begin_turn(&turn("r", "alice", true, 1))
        .await
        .unwrap();
    store.finish_turn(finished("r", 1, 2)).await.unwrap();
    store
        .begin_turn(&turn("r", "alice", false, 2))
        .await
        .unwrap();
    assert!(
        matches!(
            store.rewind_chat("r", "alice", "user-r-2", false).await,
            Err(StoreError::ChatBusy)
        ),
        "not while an answer streams"
    );
    store.finish_turn(finished("r", 2, 4)).await.unwrap();
    assert!(matches!(
        store.rewind_chat("r", "bob", "user-r-2", false).await,
        Err(StoreError::ChatNotFound)
    ));
    assert!(matches!(
        store
            .rewind_chat("r", "alice", "user-elsewhere", false)
            .await,
        Err(StoreError::MessageNotFound)
    ));

    store
        .rewind_chat("r", "alice", "user-r-2", false)
        .await
        .unwrap();
    let left = store.list_messages("r", None, 10).await.unwrap();
    let ids: Vec<&str> = left.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["user-r-1", "answer-r-1"]);
    // Asked again: ids go on growing, the new messages follow the old ones.
    let begun = store
        .begin_turn(&turn("r", "alice", false, 3))
        .await
        .unwrap();
    assert_eq!(begun.last_event_id, 4);
    let messages = store.list_messages("r", None, 10).await.unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[2].content, "question 3");

    assert!(!store.rename_chat("r", "bob", "mine").await.unwrap());
    assert!(
        store
            .rename_chat("r", "alice", "Sea voyages")
            .await
            .unwrap()
    );
    assert_eq!(
        store.get_chat("r").await.unwrap().unwrap().title,
        "Sea voyages"
    );
}

async fn writes_arriving_together_each_stay_whole_and_a_failing_one_leaves_no_trace(
    backend: Backend,
) {
    let store = backend.store.clone();
    // Mallory's chat, and a chat of Alice's with an answer still streaming.
    store
        .begin_turn(&turn("mallory-chat", "mallory", true, 0))
        .await
        .unwrap();
    store
        .begin_turn(&turn("busy-chat", "alice", true, 0))
        .await
        .unwrap();
    let mallory_before = store.get_chat("mallory-chat").await.unwrap().unwrap();
    let busy_before = store.get_chat("busy-chat").await.unwrap().unwrap();

    // 300 new chats at once, with writes that must fail mixed in among them.
    let mut writes = Vec::new();
    for n in 0..300 {
        let store = store.clone();
        writes.push(tokio::spawn(async move {
            let outcome = match n % 30 {
                7 => {
                    store
                        .begin_turn(&turn("mallory-chat", "alice", false, n))
                        .await
                }
                13 => {
                    store
                        .begin_turn(&turn("busy-chat", "alice", false, n))
                        .await
                }
                _ => {
                    store
                        .begin_turn(&turn(&format!("chat-{n}"), "alice", true, n))
                        .await
                }
            };
            (n, outcome.map(|begun| begun.last_event_id))
        }));
    }
    for written in join_all(writes).await {
        let (n, outcome) = written.unwrap();
        match n % 30 {
            7 => assert!(
                matches!(outcome, Err(StoreError::ChatNotFound)),
                "{n}: {outcome:?}"
            ),
            13 => assert!(
                matches!(outcome, Err(StoreError::ChatBusy)),
                "{n}: {outcome:?}"
            ),
            _ => assert_eq!(outcome.unwrap(), 0, "{n}"),
        }
    }

    // The refused writes left nothing: not a message, not a touched timestamp.
    let mallory_after = store.get_chat("mallory-chat").await.unwrap().unwrap();
    assert_eq!(mallory_after, mallory_before);
    let busy_after = store.get_chat("busy-chat").await.unwrap().unwrap();
    assert_eq!(
        busy_after, busy_before,
        "the busy chat's bumped timestamp was rolled back"
    );
    assert_eq!(
        store
            .list_messages("mallory-chat", None, 10_000)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        store
            .list_messages("busy-chat", None, 10_000)
            .await
            .unwrap()
            .len(),
        2
    );
    for n in (0..300).filter(|n| n % 30 != 7 && n % 30 != 13) {
        let messages = store
            .list_messages(&format!("chat-{n}"), None, 10_000)
            .await
            .unwrap();
        assert_eq!(messages.len(), 2, "chat-{n}");
        assert_eq!(messages[0].role, Role::User);
        assert_eq!(messages[0].content, format!("question {n}"));
        assert_eq!(messages[1].status, MessageStatus::Streaming);
    }

    // Finishing them all at once: each answer lands in its own row.
    let finishes = (0..300).filter(|n| n % 30 != 7 && n % 30 != 13).map(|n| {
        let store = store.clone();
        async move {
            store
                .finish_turn(finished(&format!("chat-{n}"), n, 3))
                .await
        }
    });
    for finished in join_all(finishes).await {
        finished.unwrap();
    }
    for n in (0..300).filter(|n| n % 30 != 7 && n % 30 != 13) {
        let chat_id = format!("chat-{n}");
        let messages = store.list_messages(&chat_id, None, 10_000).await.unwrap();
        assert_eq!(messages[1].content, format!("answer {n}"));
        assert_eq!(messages[1].status, MessageStatus::Complete);
        let chat = store.get_chat(&chat_id).await.unwrap().unwrap();
        assert_eq!(chat.last_event_id, 3);
    }
}

/// Starts that arrive together are begun together (SQLite's group commit, PostgreSQL's batched
/// function): one user's quota still lets exactly as many through as it allows, and a caller
/// that goes away mid-start (its client disconnected) neither halves its own turn nor holds up
/// the others begun with it.
async fn starts_arriving_together_pass_a_quota_exactly_and_a_dropped_caller_leaves_no_half_turn(
    backend: Backend,
) {
    let store = backend.store.clone();
    let quota = StorageQuota {
        max_chats: 25,
        ..StorageQuota::NONE
    };
    let starts: Vec<_> = (0..100)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut new = turn(&format!("q-{n}"), "carol", true, n);
                new.quota = quota;
                store.begin_turn(&new).await.map(|_| ())
            })
        })
        .collect();
    let mut begun = 0;
    for start in join_all(starts).await {
        match start.unwrap() {
            Ok(()) => begun += 1,
            Err(StoreError::QuotaExceeded(QuotaKind::Chats)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(begun, 25, "the chat quota let exactly its 25 chats through");
    let chats = store.list_chats("carol", 1_000, None).await.unwrap();
    assert_eq!(chats.len(), 25);

    // Half of 60 callers are dropped while their starts are in flight.
    let starts: Vec<_> = (0..60)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .begin_turn(&turn(&format!("d-{n}"), "dave", true, n))
                    .await
                    .map(|begun| begun.last_event_id)
            })
        })
        .collect();
    for start in starts.iter().step_by(2) {
        start.abort();
    }
    for (n, start) in join_all(starts).await.into_iter().enumerate() {
        match start {
            Ok(begun) => assert_eq!(begun.unwrap(), 0, "d-{n}"),
            Err(e) => assert!(e.is_cancelled() && n % 2 == 0, "d-{n}: {e:?}"),
        }
    }
    for n in 0..60 {
        let messages = store
            .list_messages(&format!("d-{n}"), None, 10)
            .await
            .unwrap();
        assert!(
            messages.is_empty() || messages.len() == 2,
            "d-{n} is whole or absent: {messages:?}"
        );
        if n % 2 == 1 {
            assert_eq!(messages.len(), 2, "d-{n} was not dropped");
        }
    }
}

async fn a_closed_store_refuses_writes_but_kept_every_one_it_accepted(backend: Backend) {
    let store = backend.store.clone();
    store
        .begin_turn(&turn("c", "alice", true, 0))
        .await
        .unwrap();
    store.finish_turn(finished("c", 0, 2)).await.unwrap();
    assert!(
        store
            .delete_chat("c", "mallory")
            .await
            .is_ok_and(|deleted| !deleted)
    );
    store.close().await;
    let refused = store.begin_turn(&turn("d", "alice", true, 0)).await;
    assert!(refused.is_err(), "{refused:?}");

    let reopened = backend.reopen().await;
    let messages = reopened.list_messages("c", None, 10_000).await.unwrap();
    assert_eq!(messages[1].content, "answer 0");
    assert!(reopened.delete_chat("c", "alice").await.unwrap());
    assert!(
        reopened
            .list_messages("c", None, 10_000)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn quotas_refuse_the_turn_that_would_pass_them_and_deleting_gives_room_back(
    backend: Backend,
) {
    let store = backend.store;
    let quota = StorageQuota {
        max_chats: 2,
        max_bytes: 1_000,
        max_turns: 2,
    };
    let with = |mut t: NewTurn| {
        t.quota = quota;
        t
    };
    store
        .begin_turn(&with(turn("a", "alice", true, 1)))
        .await
        .unwrap();
    store.finish_turn(finished("a", 1, 2)).await.unwrap();
    store
        .begin_turn(&with(turn("a", "alice", false, 2)))
        .await
        .unwrap();
    store.finish_turn(finished("a", 2, 4)).await.unwrap();
    assert!(matches!(
        store.begin_turn(&with(turn("a", "alice", false, 3))).await,
        Err(StoreError::QuotaExceeded(QuotaKind::Turns))
    ));
    store
        .begin_turn(&with(turn("b", "alice", true, 1)))
        .await
        .unwrap();
    store.finish_turn(finished("b", 1, 2)).await.unwrap();
    assert!(matches!(
        store.begin_turn(&with(turn("c", "alice", true, 1))).await,
        Err(StoreError::QuotaExceeded(QuotaKind::Chats))
    ));
    assert!(
        store
            .begin_turn(&with(turn("c", "bob", true, 1)))
            .await
            .is_ok(),
        "per user"
    );
    let mut big = with(turn("b", "alice", false, 2));
    big.message = "x".repeat(1_000);
    assert!(matches!(
        store.begin_turn(&big).await,
        Err(StoreError::QuotaExceeded(QuotaKind::Bytes))
    ));
    assert_eq!(
        store.list_messages("b", None, 100).await.unwrap().len(),
        2,
        "left no trace"
    );

    assert!(store.delete_chat("a", "alice").await.unwrap());
    store
        .begin_turn(&with(turn("d", "alice", true, 1)))
        .await
        .unwrap();
}

async fn message_pages_follow_each_other_and_recent_messages_are_the_last(backend: Backend) {
    let store = backend.store;
    store
        .begin_turn(&turn("p", "alice", true, 1))
        .await
        .unwrap();
    store.finish_turn(finished("p", 1, 2)).await.unwrap();
    for n in 2..=5 {
        store
            .begin_turn(&turn("p", "alice", false, n))
            .await
            .unwrap();
        store
            .finish_turn(finished("p", n, 2 * n as i64))
            .await
            .unwrap();
    }
    let first = store.list_messages("p", None, 4).await.unwrap();
    let rest = store
        .list_messages("p", Some(first.last().unwrap().seq), 100)
        .await
        .unwrap();
    assert_eq!(first.len() + rest.len(), 10);
    let seqs: Vec<i64> = first.iter().chain(&rest).map(|m| m.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let recent = store.recent_messages("p", 2).await.unwrap();
    assert_eq!(recent[0].content, "question 5");
    assert_eq!(recent[1].role, Role::Assistant);
}

/// A chat of `turns` finished turns, `n`-th question "question n", answer "answer n".
async fn chat_of(store: &Arc<dyn ChatStore>, chat_id: &str, user: &str, turns: usize) {
    for n in 1..=turns {
        store
            .begin_turn(&turn(chat_id, user, n == 1, n))
            .await
            .unwrap();
        store
            .finish_turn(finished(chat_id, n, 2 * n as i64))
            .await
            .unwrap();
    }
}

async fn message_pages_run_backwards_from_the_newest_or_from_a_message(backend: Backend) {
    let store = backend.store;
    chat_of(&store, "b", "alice", 6).await;
    let newest = store.messages_before("b", None, 4).await.unwrap();
    let texts: Vec<&str> = newest.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(texts, ["question 5", "answer 5", "question 6", "answer 6"]);
    let older = store
        .messages_before("b", Some(newest[0].seq), 100)
        .await
        .unwrap();
    assert_eq!(older.len(), 8);
    assert_eq!(older.last().unwrap().content, "answer 4");
    assert!(older.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        store.message_seq("b", "answer-b-4").await.unwrap(),
        Some(older[7].seq)
    );
    assert_eq!(store.message_seq("b", "answer-x-4").await.unwrap(), None);
    assert_eq!(
        store.message_seq("other", "answer-b-4").await.unwrap(),
        None
    );
    assert!(
        store
            .messages_before("b", Some(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

fn terms(query: &str) -> SearchTerms {
    SearchTerms::parse(query).unwrap()
}

async fn found(store: &Arc<dyn ChatStore>, user: &str, query: &str) -> Vec<String> {
    let hits = store
        .search_chats(user, &terms(query), 100, None)
        .await
        .unwrap();
    hits.into_iter().map(|hit| hit.chat.id).collect()
}

async fn search_finds_titles_and_finished_messages_of_the_user_only(backend: Backend) {
    let store = backend.store;
    let mut lisbon = turn("trip", "alice", true, 1);
    lisbon.message = "Three days in Lisbon, on foot".into();
    store.begin_turn(&lisbon).await.unwrap();
    let mut answer = finished("trip", 1, 2);
    answer.content = "Start at the Alfama: trams, miradouros and pastéis de nata.".into();
    store.finish_turn(answer).await.unwrap();
    let mut other = turn("bob-trip", "bob", true, 1);
    other.message = "Lisbon with kids".into();
    store.begin_turn(&other).await.unwrap();
    store.finish_turn(finished("bob-trip", 1, 2)).await.unwrap();

    assert_eq!(found(&store, "alice", "lisbon").await, ["trip"]);
    assert_eq!(found(&store, "bob", "LISBON").await, ["bob-trip"]);
    // Word prefixes, all words required, in the answer's text as well as the question's.
    assert_eq!(found(&store, "alice", "alfa tram").await, ["trip"]);
    assert!(found(&store, "alice", "alfama kids").await.is_empty());
    assert!(found(&store, "alice", "fama").await.is_empty());
    let hit = &store
        .search_chats("alice", &terms("miradouros"), 10, None)
        .await
        .unwrap()[0];
    assert_eq!(hit.message_id.as_deref(), Some("answer-trip-1"));
    assert!(hit.message_text.as_deref().unwrap().contains("Alfama"));

    // An answer still streaming is not searchable yet; once it ends, it is.
    let mut second = turn("trip", "alice", false, 2);
    second.message = "and then?".into();
    store.begin_turn(&second).await.unwrap();
    store
        .save_partial(PartialAnswer {
            assistant_message_id: "answer-trip-2".into(),
            chunks: vec!["Sintra by train".into()],
            reserved_event_id: 10,
        })
        .await
        .unwrap();
    assert!(found(&store, "alice", "sintra").await.is_empty());
    let mut done = finished("trip", 2, 12);
    done.content = "Sintra by train, then Cascais.".into();
    store.finish_turn(done).await.unwrap();
    assert_eq!(found(&store, "alice", "sintra cascais").await, ["trip"]);
    let hit = &store
        .search_chats("alice", &terms("lisbon"), 10, None)
        .await
        .unwrap()[0];
    assert_eq!(hit.message_id.as_deref(), Some("user-trip-1"));
}

async fn search_follows_renames_rewinds_and_deletes_and_pages_by_recency(backend: Backend) {
    let store = backend.store;
    for n in 1..=5 {
        chat_of(&store, &format!("c{n}"), "alice", 1).await;
    }
    // Every chat holds "question 1": all match, newest activity first, a page at a time.
    let first = store
        .search_chats("alice", &terms("question"), 2, None)
        .await
        .unwrap();
    let ids: Vec<&str> = first.iter().map(|h| h.chat.id.as_str()).collect();
    assert_eq!(ids, ["c5", "c4"]);
    let cursor = mangoo::store::ChatCursor {
        updated_at_ms: first[1].chat.updated_at_ms,
        id: first[1].chat.id.clone(),
    };
    let rest = store
        .search_chats("alice", &terms("question"), 10, Some(&cursor))
        .await
        .unwrap();
    let ids: Vec<&str> = rest.iter().map(|h| h.chat.id.as_str()).collect();
    assert_eq!(ids, ["c3", "c2", "c1"]);

    assert!(
        store
            .rename_chat("c2", "alice", "Budget for March")
            .await
            .unwrap()
    );
    assert_eq!(found(&store, "alice", "budget").await, ["c2"]);
    // Every word in one place: the title, or one message.
    assert!(found(&store, "alice", "question budget").await.is_empty());
    store
        .rewind_chat("c3", "alice", "user-c3-1", false)
        .await
        .unwrap();
    assert!(store.delete_chat("c4", "alice").await.unwrap());
    assert_eq!(found(&store, "alice", "answer").await, ["c5", "c2", "c1"]);

    // The newest messages deleted, their row ids are taken again: the index forgot the old
    // words, so the new chat matches only its own.
    assert!(store.delete_chat("c5", "alice").await.unwrap());
    let mut fresh = turn("c7", "alice", true, 1);
    fresh.message = "fresh start".into();
    store.begin_turn(&fresh).await.unwrap();
    let mut reply = finished("c7", 1, 2);
    reply.content = "brand new".into();
    store.finish_turn(reply).await.unwrap();
    assert_eq!(found(&store, "alice", "answer").await, ["c2", "c1"]);
    assert_eq!(found(&store, "alice", "brand").await, ["c7"]);
}

async fn an_answer_is_concluded_once_and_the_first_conclusion_stands(backend: Backend) {
    let store = backend.store;
    store
        .begin_turn(&turn("c", "alice", true, 0))
        .await
        .unwrap();
    let mut interrupted = finished("c", 0, 5);
    interrupted.status = MessageStatus::Interrupted;
    interrupted.content = "ans".into();
    interrupted.chunks = vec!["ans".into()];
    assert!(
        store.finish_turn(interrupted).await.unwrap(),
        "the first conclusion applies"
    );
    assert!(
        !store.finish_turn(finished("c", 0, 9)).await.unwrap(),
        "a second one (a producer that lost its lease) is refused"
    );
    let partial = PartialAnswer {
        assistant_message_id: "answer-c-0".into(),
        chunks: vec!["late".into()],
        reserved_event_id: 100,
    };
    assert!(
        !store.save_partial(partial).await.unwrap(),
        "nor can it save text"
    );
    let messages = store.list_messages("c", None, 10).await.unwrap();
    assert_eq!(messages[1].content, "ans");
    assert_eq!(messages[1].status, MessageStatus::Interrupted);
    let chat = store.get_chat("c").await.unwrap().unwrap();
    assert_eq!(chat.last_event_id, 5, "the refused conclusion moved no ids");
}

async fn a_crashed_answer_keeps_its_saved_text_and_its_ids_are_never_reused(backend: Backend) {
    let store = backend.store.clone();
    store
        .begin_turn(&turn("c", "alice", true, 0))
        .await
        .unwrap();
    store.finish_turn(finished("c", 0, 3)).await.unwrap();
    store
        .begin_turn(&turn("c", "alice", false, 1))
        .await
        .unwrap();
    // Start is id 4; two pieces saved (5, 6), ids reserved up to 40 when the process died.
    let partial = PartialAnswer {
        assistant_message_id: "answer-c-1".into(),
        chunks: vec!["Hel".into(), "lo".into()],
        reserved_event_id: 40,
    };
    assert!(store.save_partial(partial).await.unwrap());
    drop(store);

    let restarted = backend.reopen().await;
    assert_eq!(restarted.recover_abandoned_turns().await.unwrap(), 1);
    let messages = restarted.list_messages("c", None, 10).await.unwrap();
    let answer = &messages[3];
    assert_eq!(answer.status, MessageStatus::Interrupted);
    assert_eq!(answer.content, "Hello");
    assert_eq!(answer.error_code.as_deref(), Some("server_restarted"));
    let replay = answer.replay.as_ref().unwrap();
    assert_eq!(replay.first_event_id, 4);
    assert_eq!(replay.terminal_event_id(), 41, "past every reserved id");
    let chat = restarted.get_chat("c").await.unwrap().unwrap();
    assert_eq!(chat.last_event_id, 41, "the next turn starts after it");
    let next = restarted
        .begin_turn(&turn("c", "alice", false, 2))
        .await
        .unwrap();
    assert_eq!(next.last_event_id, 41, "the chat takes a new turn");
}

async fn chat_history_is_the_owners_only_and_holds_the_last_messages(backend: Backend) {
    let store = backend.store;
    store
        .begin_turn(&turn("h", "alice", true, 1))
        .await
        .unwrap();
    store.finish_turn(finished("h", 1, 2)).await.unwrap();
    for n in 2..=4 {
        store
            .begin_turn(&turn("h", "alice", false, n))
            .await
            .unwrap();
        store
            .finish_turn(finished("h", n, 2 * n as i64))
            .await
            .unwrap();
    }
    assert!(
        store
            .chat_history("h", "mallory", 10)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .chat_history("nope", "alice", 10)
            .await
            .unwrap()
            .is_none()
    );
    let (chat, messages) = store.chat_history("h", "alice", 3).await.unwrap().unwrap();
    assert_eq!(chat.id, "h");
    assert_eq!(chat.last_event_id, 8);
    let contents: Vec<_> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["answer 3", "question 4", "answer 4"]);
    store
        .begin_turn(&turn("empty", "alice", true, 1))
        .await
        .unwrap();
    store.delete_chat("empty", "alice").await.unwrap();
    store.begin_turn(&turn("e2", "bob", true, 1)).await.unwrap();
    let (_, two) = store.chat_history("e2", "bob", 10).await.unwrap().unwrap();
    assert_eq!(two.len(), 2);
}

/// Two processes (two stores on one database) asked for a turn in the same chat at the same
/// moment: one answer streams, the other is refused as busy.
async fn two_instances_racing_for_one_chat_start_exactly_one_answer(backend: Backend) {
    let a = backend.store.clone();
    a.begin_turn(&turn("r", "alice", true, 0)).await.unwrap();
    a.finish_turn(finished("r", 0, 2)).await.unwrap();
    let b = backend.reopen().await;
    for round in 1..=10 {
        let (one, other) = (
            turn("r", "alice", false, 2 * round),
            turn("r", "alice", false, 2 * round + 1),
        );
        let (left, right) = tokio::join!(a.begin_turn(&one), b.begin_turn(&other));
        let won = [&left, &right].iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {left:?} / {right:?}");
        let loser = if left.is_ok() { &right } else { &left };
        assert!(matches!(loser, Err(StoreError::ChatBusy)), "{loser:?}");
        let winner = if left.is_ok() {
            2 * round
        } else {
            2 * round + 1
        };
        a.finish_turn(finished("r", winner, 2 + 2 * round as i64))
            .await
            .unwrap();
    }
}

/// Instances starting at the same moment on a fresh PostgreSQL database: every one migrates or
/// waits for the one that does (the migrator's advisory lock), and all of them then work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_on_a_fresh_postgres_database_all_come_up() {
    let database = TestDatabase::create().await;
    let config = DatabaseConfig {
        url: database.url.clone(),
        ..DatabaseConfig::default()
    };
    let stores = join_all((0..6).map(|_| mangoo::store::connect(&config))).await;
    let stores: Vec<_> = stores.into_iter().map(Result::unwrap).collect();
    for (n, store) in stores.iter().enumerate() {
        let chat = format!("chat-{n}");
        store
            .begin_turn(&turn(&chat, "alice", true, n))
            .await
            .unwrap();
        store.finish_turn(finished(&chat, n, 2)).await.unwrap();
    }
    let listed = stores[0].list_chats("alice", 100, None).await.unwrap();
    assert_eq!(listed.len(), 6);
}

async fn a_regenerated_answer_keeps_the_ones_it_replaced_until_its_place_is_rewound(
    backend: Backend,
) {
    let store = backend.store;
    chat_of(&store, "v", "alice", 2).await;
    // Regenerate turn 2 three times: ask again after a rewind that keeps the answer.
    for (n, answer) in [(3, "second try"), (4, "third try"), (5, "fourth try")] {
        let question = format!("user-v-{}", n - 1);
        store
            .rewind_chat("v", "alice", &question, true)
            .await
            .unwrap();
        let mut again = turn("v", "alice", false, n);
        again.message = "question 2".into();
        store.begin_turn(&again).await.unwrap();
        let mut done = finished("v", n, 10 * n as i64);
        done.content = answer.into();
        store.finish_turn(done).await.unwrap();
    }
    let messages = store.list_messages("v", None, 100).await.unwrap();
    let texts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        texts,
        ["question 1", "answer 1", "question 2", "fourth try"]
    );
    let versions = store.answer_versions("v", 1, 4).await.unwrap();
    let earlier: Vec<(&str, i64)> = versions
        .iter()
        .map(|v| (v.content.as_str(), v.seq))
        .collect();
    assert_eq!(
        earlier,
        [("answer 2", 4), ("second try", 4), ("third try", 4)]
    );
    assert_eq!(versions[0].id, "answer-v-2");
    assert_eq!(versions[0].status, MessageStatus::Complete);
    assert!(store.answer_versions("v", 1, 3).await.unwrap().is_empty());

    // Only the newest are kept.
    for n in 6..20 {
        store
            .rewind_chat("v", "alice", &format!("user-v-{}", n - 1), true)
            .await
            .unwrap();
        store
            .begin_turn(&turn("v", "alice", false, n))
            .await
            .unwrap();
        store
            .finish_turn(finished("v", n, 10 * n as i64))
            .await
            .unwrap();
    }
    let versions = store.answer_versions("v", 4, 4).await.unwrap();
    assert_eq!(versions.len() as i64, mangoo::store::MAX_ANSWER_VERSIONS);
    assert_eq!(versions.last().unwrap().content, "answer 18");

    // An edit (a rewind that keeps nothing) takes that place's versions with it; deleting the
    // chat takes the rest.
    store
        .rewind_chat("v", "alice", "user-v-19", false)
        .await
        .unwrap();
    assert!(store.answer_versions("v", 0, 100).await.unwrap().is_empty());
    chat_of(&store, "w", "alice", 1).await;
    store
        .rewind_chat("w", "alice", "user-w-1", true)
        .await
        .unwrap();
    assert_eq!(store.answer_versions("w", 0, 100).await.unwrap().len(), 1);
    assert!(store.delete_chat("w", "alice").await.unwrap());
    assert!(store.answer_versions("w", 0, 100).await.unwrap().is_empty());
}
