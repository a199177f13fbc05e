//! The SQLite schema's migrations, embedded in the binary (nothing is read from disk at run
//! time) and applied by sqlx's migrator with the checksums its `migrate!` macro would compute,
//! so databases created by earlier releases carry on. Not the macro itself: it compiles a second
//! copy of sqlx and of SQLite, for the compiler, into every cold build.

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::SqlitePool;
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};

/// Version, description (as the macro derives it from the file name) and SQL, in order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "chats",
        include_str!("../../../migrations/sqlite/0001_chats.sql"),
    ),
    (
        2,
        "replayable answers",
        include_str!("../../../migrations/sqlite/0002_replayable_answers.sql"),
    ),
    (
        3,
        "usage quotas",
        include_str!("../../../migrations/sqlite/0003_usage_quotas.sql"),
    ),
];

#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async {
            let migrations = MIGRATIONS
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

/// Applies the migrations the database does not have yet.
pub async fn run(pool: &SqlitePool) -> Result<(), MigrateError> {
    Migrator::new(Embedded).await?.run(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sqlx reading the folder resolves the files exactly as its `migrate!` macro did for
    /// earlier releases: the same versions, descriptions and checksums mean their databases
    /// migrate on.
    #[tokio::test]
    async fn the_embedded_migrations_are_the_files_as_sqlx_reads_them() {
        let folder =
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"));
        let from_files = Migrator::new(folder).await.unwrap();
        let embedded = Migrator::new(Embedded).await.unwrap();
        let key = |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec());
        let files: Vec<_> = from_files.iter().map(key).collect();
        let ours: Vec<_> = embedded.iter().map(key).collect();
        assert_eq!(ours, files, "a migration file is not embedded, or differs");
    }
}
