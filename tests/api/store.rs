//! The SQLite store below the HTTP layer: writes that arrive together share one transaction
//! (group commit), so these check that a batch keeps every write whole and separate.

use std::sync::Arc;

use futures_util::future::join_all;
use mangoo::store::{
    ChatStore, FinishedTurn, MessageStatus, NewTurn, QuotaKind, Role, SqliteStore, StorageQuota,
    StoreError,
};

fn turn(chat_id: &str, user: &str, new_chat: bool, n: usize) -> NewTurn {
    NewTurn {
        chat_id: chat_id.into(),
        user_id: user.into(),
        new_chat,
        bot_id: "bot".into(),
        user_message_id: format!("user-{chat_id}-{n}"),
        assistant_message_id: format!("answer-{chat_id}-{n}"),
        message: format!("question {n}"),
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
    }
}

async fn store() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    (dir, Arc::new(SqliteStore::connect(&url).await.unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_arriving_together_each_stay_whole_and_a_failing_one_leaves_no_trace() {
    let (_dir, store) = store().await;
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

#[tokio::test]
async fn a_closed_store_refuses_writes_but_kept_every_one_it_accepted() {
    let (dir, store) = store().await;
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
    assert!(matches!(refused, Err(StoreError::Closed)), "{refused:?}");

    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let reopened = SqliteStore::connect(&url).await.unwrap();
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

async fn fresh_store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    (SqliteStore::connect(&url).await.unwrap(), dir)
}

#[tokio::test]
async fn quotas_refuse_the_turn_that_would_pass_them_and_deleting_gives_room_back() {
    let (store, _dir) = fresh_store().await;
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

#[tokio::test]
async fn message_pages_follow_each_other_and_recent_messages_are_the_last() {
    let (store, _dir) = fresh_store().await;
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
