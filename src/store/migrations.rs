//! The schemas' migrations, embedded in the binary (nothing is read from disk at run time) and
//! applied by sqlx's migrator with the checksums its `migrate!` macro would compute, so databases
//! created by earlier releases carry on. Not the macro itself: it compiles a second copy of sqlx
//! and of SQLite, for the compiler, into every cold build.
//!
//! On PostgreSQL the migrator holds an advisory lock while it runs, so instances that start at
//! the same moment on a fresh database apply each migration once and wait for one another.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

/// Version, description (as the macro derives it from the file name) and SQL, in order.
type Embedded = &'static [(i64, &'static str, &'static str)];

pub(super) const SQLITE: Embedded = &[
    (
        1,
        "chats",
        include_str!("../../migrations/sqlite/0001_chats.sql"),
    ),
    (
        2,
        "replayable answers",
        include_str!("../../migrations/sqlite/0002_replayable_answers.sql"),
    ),
    (
        3,
        "usage quotas",
        include_str!("../../migrations/sqlite/0003_usage_quotas.sql"),
    ),
    (
        4,
        "answer event ids",
        include_str!("../../migrations/sqlite/0004_answer_event_ids.sql"),
    ),
    (
        5,
        "search",
        include_str!("../../migrations/sqlite/0005_search.sql"),
    ),
    (
        6,
        "answer versions",
        include_str!("../../migrations/sqlite/0006_answer_versions.sql"),
    ),
    (
        7,
        "usage ledger",
        include_str!("../../migrations/sqlite/0007_usage_ledger.sql"),
    ),
];

pub(super) const POSTGRES: Embedded = &[
    (
        1,
        "schema",
        include_str!("../../migrations/postgres/0001_schema.sql"),
    ),
    (
        2,
        "repeatable turns",
        include_str!("../../migrations/postgres/0002_repeatable_turns.sql"),
    ),
    (
        3,
        "search",
        include_str!("../../migrations/postgres/0003_search.sql"),
    ),
    (
        4,
        "answer versions",
        include_str!("../../migrations/postgres/0004_answer_versions.sql"),
    ),
    (
        5,
        "batched turns",
        include_str!("../../migrations/postgres/0005_batched_turns.sql"),
    ),
    (
        6,
        "usage ledger",
        include_str!("../../migrations/postgres/0006_usage_ledger.sql"),
    ),
];

#[derive(Debug)]
struct Source(Embedded);

impl<'s> MigrationSource<'s> for Source {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move {
            let migrations = self
                .0
                .iter()
                .map(|(version, description, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect();
            Ok(migrations)
        })
    }
}

pub(super) async fn migrator(migrations: Embedded) -> Result<Migrator, MigrateError> {
    Migrator::new(Source(migrations)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sqlx reading the folder resolves the files exactly as its `migrate!` macro did for
    /// earlier releases: the same versions, descriptions and checksums mean their databases
    /// migrate on.
    #[tokio::test]
    async fn the_embedded_migrations_are_the_files_as_sqlx_reads_them() {
        for (folder, embedded) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(folder);
            let from_files = Migrator::new(path).await.unwrap();
            let ours = migrator(embedded).await.unwrap();
            let key = |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec());
            let files: Vec<_> = from_files.iter().map(key).collect();
            let ours: Vec<_> = ours.iter().map(key).collect();
            assert_eq!(
                ours, files,
                "a {folder} migration is not embedded, or differs"
            );
        }
    }
}
