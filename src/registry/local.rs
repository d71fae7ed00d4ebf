//! The embedded backend: ECR's semantics over SQLite (`serve --backend local --data-dir DIR`),
//! so the API runs on a laptop or in a client's CI with no AWS account.
//!
//! What ECR does, this does: the digest is SHA-256 of the exact bytes, a put moves a tag, a
//! re-put is idempotent, a tag-immutable repository refuses to move a tag, and missing
//! repositories, images and tag/digest disagreements fail with the same errors. Divergences,
//! all documented in the README: a put creates its repository (ECR needs CreateRepository
//! first), which repositories are tag-immutable comes from configuration, and there is one
//! registry (any other registry ID has no repositories).
//!
//! Durability: SQLite in WAL mode with `synchronous = FULL`, so a put is acknowledged only
//! after its transaction is on disk; a `kill -9` loses nothing that was acknowledged.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    CacheStatus, DeleteFailure, DeleteImagesInput, DeleteOutcome, Deleted, DescribeInput,
    DescribePage, Fetched, GetImageInput, ImageDetail, ListInput, ListPage, PutImageInput,
    PutOutcome, Registry, RegistryError, RepositoryKey, StoredImage, TagStatus, Upstream,
};
use crate::domain::image::{Digest, ImageRef, RegistryId, RepositoryName, Tag, media_types};

/// The registry ID the embedded store answers as: a placeholder account, 12 digits like ECR's.
pub const DEFAULT_REGISTRY_ID: &str = "000000000000";
/// The database file inside `--data-dir`.
const DATABASE_FILE: &str = "images.sqlite3";
/// The lock file inside `--data-dir`, held exclusively by the serving process.
const LOCK_FILE: &str = "lock";
/// The data directory's mode when the store creates it: the service's user only.
const PRIVATE_DIR_MODE: u32 = 0o700;
/// The database's and the lock's mode: the service's user only.
const PRIVATE_FILE_MODE: u32 = 0o600;
/// A writer waits this long for another (another process on the same directory) before the
/// put fails as unavailable; one process never waits, its connection is behind a mutex.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS repositories (
        name TEXT PRIMARY KEY,
        tag_immutable INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE IF NOT EXISTS images (
        repository TEXT NOT NULL REFERENCES repositories (name),
        digest TEXT NOT NULL,
        manifest TEXT NOT NULL,
        media_type TEXT NOT NULL,
        pushed_at INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (repository, digest)
    ) STRICT;
    CREATE TABLE IF NOT EXISTS tags (
        repository TEXT NOT NULL,
        tag TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (repository, tag),
        FOREIGN KEY (repository, digest) REFERENCES images (repository, digest)
    ) STRICT;
";

/// How the embedded store is set up.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The directory holding the database; created if missing.
    pub data_dir: PathBuf,
    /// The registry ID reported in responses.
    pub registry_id: String,
    /// Repositories created tag-immutable: exact names, or `prefix/*` for a namespace.
    pub immutable_repositories: Vec<String>,
}

/// The embedded store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the local store in {dir}: {source}")]
pub struct OpenError {
    dir: PathBuf,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// ECR's semantics over an SQLite database in one directory.
#[derive(Clone)]
pub struct LocalRegistry {
    connection: Arc<Mutex<Connection>>,
    registry_id: String,
    immutable_repositories: Arc<[String]>,
    /// The directory's lock, held as long as any clone of the store lives: a second process on
    /// the same directory would turn two caches' view of it into two truths.
    _lock: Arc<std::fs::File>,
}

impl LocalRegistry {
    /// Opens (creating if needed) the store in `settings.data_dir`.
    pub fn open(settings: &LocalSettings) -> Result<Self, OpenError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| OpenError {
            dir: settings.data_dir.clone(),
            source,
        };
        let dir = &settings.data_dir;
        // Only the service's own user reads what clients stored: 0700 and 0600.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(dir)
            .map_err(|e| failed(e.into()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(PRIVATE_FILE_MODE)
            .open(dir.join(LOCK_FILE))
            .map_err(|e| failed(e.into()))?;
        lock.try_lock().map_err(|_| {
            failed(
                "another process holds this data directory's lock: one process serves a store"
                    .into(),
            )
        })?;
        let path = dir.join(DATABASE_FILE);
        // Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(|e| failed(e.into()))?;
        let connection = open_database(&path).map_err(|e| failed(damaged(e)))?;
        check_integrity(&connection).map_err(failed)?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
            registry_id: settings.registry_id.clone(),
            immutable_repositories: settings.immutable_repositories.clone().into(),
            _lock: Arc::new(lock),
        })
    }

    /// Creates a repository, or sets an existing one's tag mutability: what ECR's
    /// CreateRepository and PutImageTagMutability do, for set-up and tests.
    pub async fn create_repository(
        &self,
        repository: &RepositoryName,
        tag_immutable: bool,
    ) -> Result<(), RegistryError> {
        let name = repository.as_str().to_owned();
        self.with_connection(move |connection| {
            connection.execute(
                "INSERT INTO repositories (name, tag_immutable) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET tag_immutable = excluded.tag_immutable",
                params![name, tag_immutable],
            )?;
            Ok(())
        })
        .await
    }

    /// Whether a repository created by a put is tag-immutable, by configuration.
    fn configured_immutable(&self, repository: &RepositoryName) -> bool {
        let name = repository.as_str();
        self.immutable_repositories
            .iter()
            .any(|pattern| match pattern.strip_suffix("/*") {
                Some(prefix) => name
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('/')),
                None => pattern == name,
            })
    }

    /// Runs `work` on the connection off the async runtime: SQLite blocks, on disk syncs too.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, Failure> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let connection = Arc::clone(&self.connection);
        let joined = tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut connection)
        })
        .await;
        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Failure::Registry(err))) => Err(err),
            Ok(Err(Failure::Store(err))) => Err(store_error(&err)),
            Err(join) => Err(RegistryError::Other(Upstream::message(format!(
                "the local store's worker failed: {join}"
            )))),
        }
    }

    /// Any registry ID but ours holds no repositories.
    fn check_registry(
        &self,
        registry_id: Option<&RegistryId>,
        repository: &RepositoryName,
    ) -> Result<(), RegistryError> {
        match registry_id {
            Some(id) if id.as_str() != self.registry_id => {
                Err(repository_not_found(repository.as_str(), id.as_str()))
            }
            _ => Ok(()),
        }
    }
}

/// Opens the database, durable and with the schema in place.
/// Refuses a store that fails SQLite's `quick_check`: a damaged file answered false NOT_FOUNDs
/// and still took writes. Better not to serve than to serve wrong answers.
fn check_integrity(connection: &Connection) -> Result<(), BoxError> {
    let problems: Result<Vec<String>, _> =
        connection
            .prepare("PRAGMA quick_check")
            .and_then(|mut check| {
                check
                    .query_map([], |row| row.get::<_, String>(0))?
                    .collect()
            });
    match problems {
        Ok(problems) if problems == ["ok"] => Ok(()),
        Ok(problems) => Err(damaged_message(
            problems.first().map_or("no answer", String::as_str),
        )),
        Err(err) => Err(damaged(err)),
    }
}

/// Errors at open, boxed for [`OpenError`].
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What to do about a store SQLite finds damaged, with what it said.
fn damaged_message(found: &str) -> BoxError {
    format!(
        "the database fails SQLite's integrity check ({found}); restore it from a backup or \
         move it aside, then start again"
    )
    .into()
}

/// A failure at open, with the integrity guidance when SQLite says the file is damaged.
fn damaged(err: rusqlite::Error) -> BoxError {
    match err.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            damaged_message(&err.to_string())
        }
        _ => err.into(),
    }
}

fn open_database(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never block the writer; FULL: a commit is on disk before it returns.
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", true)?;
    connection.execute_batch(SCHEMA)?;
    // Stores made before DescribeImages have no push times: theirs read as the epoch.
    let has_pushed_at = connection
        .prepare("SELECT 1 FROM pragma_table_info('images') WHERE name = 'pushed_at'")?
        .exists([])?;
    if !has_pushed_at {
        connection
            .execute_batch("ALTER TABLE images ADD COLUMN pushed_at INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(connection)
}

/// Why a store operation failed: a registry answer (not found, conflict) or SQLite itself.
enum Failure {
    Registry(RegistryError),
    Store(rusqlite::Error),
}

impl From<rusqlite::Error> for Failure {
    fn from(err: rusqlite::Error) -> Self {
        Failure::Store(err)
    }
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Self {
        Failure::Registry(err)
    }
}

/// SQLite failing (an I/O error, a lock held too long) is the store being unavailable, as a
/// failing ECR would be: retryable, and the server's problem. A full disk is not retryable by
/// waiting: it is its own error, RESOURCE_EXHAUSTED, so clients do not retry it blindly.
fn store_error(err: &rusqlite::Error) -> RegistryError {
    let full = err.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
    let upstream = Upstream {
        message: if full {
            "the local store's disk is full".to_owned()
        } else {
            "the local store failed".to_owned()
        },
        detail: format!("local store: {err}"),
        ..Upstream::default()
    };
    if full {
        RegistryError::StoreFull(upstream)
    } else {
        RegistryError::Unavailable(upstream)
    }
}

/// ECR's error, in ECR's words, with its exception name as the code.
fn answer(code: &str, message: String) -> Upstream {
    Upstream {
        code: Some(code.to_owned()),
        message,
        ..Upstream::default()
    }
}

fn repository_not_found(repository: &str, registry_id: &str) -> RegistryError {
    RegistryError::RepositoryNotFound(answer(
        "RepositoryNotFoundException",
        format!(
            "The repository with name '{repository}' does not exist in the registry with id \
             '{registry_id}'"
        ),
    ))
}

/// `RepositoryNotFound` unless the store has `repository`: ECR's answer to reading or deleting
/// in a repository nobody created.
fn require_repository(
    connection: &Connection,
    repository: &str,
    registry_id: &str,
) -> Result<(), Failure> {
    let known = connection
        .query_row(
            "SELECT 1 FROM repositories WHERE name = ?1",
            [repository],
            |_| Ok(()),
        )
        .optional()?;
    match known {
        Some(()) => Ok(()),
        None => Err(repository_not_found(repository, registry_id).into()),
    }
}

fn image_not_found(reference: &ImageRef, repository: &str) -> RegistryError {
    RegistryError::ImageNotFound(answer(
        "ImageNotFound",
        format!("Requested image {reference} not found in repository '{repository}'"),
    ))
}

impl LocalRegistry {
    async fn put(&self, input: PutImageInput) -> Result<(StoredImage, PutOutcome), RegistryError> {
        self.check_registry(input.registry_id.as_ref(), &input.repository)?;
        let immutable_if_new = self.configured_immutable(&input.repository);
        let registry_id = self.registry_id.clone();
        self.with_connection(move |connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let repository = input.repository.as_str();
            let digest = input.manifest.digest().as_str();
            transaction.execute(
                "INSERT INTO repositories (name, tag_immutable) VALUES (?1, ?2)
                 ON CONFLICT (name) DO NOTHING",
                params![repository, immutable_if_new],
            )?;
            let tag_immutable: bool = transaction.query_row(
                "SELECT tag_immutable FROM repositories WHERE name = ?1",
                [repository],
                |row| row.get(0),
            )?;
            let image_existed = has_image(&transaction, repository, digest)?;
            let tag_target: Option<String> = match &input.tag {
                Some(tag) => transaction
                    .query_row(
                        "SELECT digest FROM tags WHERE repository = ?1 AND tag = ?2",
                        params![repository, tag.as_str()],
                        |row| row.get(0),
                    )
                    .optional()?,
                None => None,
            };
            let outcome = match (&input.tag, tag_target.as_deref()) {
                // The same bytes under the same tag, or untagged again: nothing changes.
                (Some(_), Some(current)) if current == digest => PutOutcome::AlreadyExisted,
                (None, _) if image_existed => PutOutcome::AlreadyExisted,
                (Some(tag), Some(current)) if tag_immutable => {
                    return Err(RegistryError::TagAlreadyExists(answer(
                        "ImageTagAlreadyExistsException",
                        format!(
                            "The image tag '{tag}' already exists in the '{repository}' \
                             repository (it points at {current}) and cannot be overwritten \
                             because the repository is immutable."
                        ),
                    ))
                    .into());
                }
                _ => PutOutcome::Created,
            };
            if outcome == PutOutcome::Created {
                transaction.execute(
                    "INSERT INTO images (repository, digest, manifest, media_type, pushed_at)
                     VALUES (?1, ?2, ?3, ?4, unixepoch()) ON CONFLICT DO NOTHING",
                    params![
                        repository,
                        digest,
                        input.manifest.as_str(),
                        input.manifest.media_type().as_str()
                    ],
                )?;
                if let Some(tag) = &input.tag {
                    transaction.execute(
                        "INSERT INTO tags (repository, tag, digest) VALUES (?1, ?2, ?3)
                         ON CONFLICT (repository, tag) DO UPDATE SET digest = excluded.digest",
                        params![repository, tag.as_str(), digest],
                    )?;
                }
                transaction.commit()?;
            }
            Ok((input.into_stored(registry_id), outcome))
        })
        .await
    }

    async fn get(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
        self.check_registry(input.registry_id.as_ref(), &input.repository)?;
        let registry_id = self.registry_id.clone();
        let image = self
            .with_connection(move |connection| {
                let repository = input.repository.as_str();
                require_repository(connection, repository, &registry_id)?;
                let reference = &input.reference;
                let digest = match (reference.tag(), reference.digest()) {
                    (Some(tag), asked) => {
                        let tagged: Option<String> = connection
                            .query_row(
                                "SELECT digest FROM tags WHERE repository = ?1 AND tag = ?2",
                                params![repository, tag.as_str()],
                                |row| row.get(0),
                            )
                            .optional()?;
                        let tagged =
                            tagged.ok_or_else(|| image_not_found(reference, repository))?;
                        if let Some(asked) = asked
                            && asked.as_str() != tagged
                        {
                            return Err(RegistryError::TagDigestMismatch(answer(
                                "ImageTagDoesNotMatchDigest",
                                format!("Tag '{tag}' points at {tagged}, not at {asked}"),
                            ))
                            .into());
                        }
                        tagged
                    }
                    (None, Some(digest)) => digest.as_str().to_owned(),
                    (None, None) => return Err(image_not_found(reference, repository).into()),
                };
                let row: Option<(String, String)> = connection
                    .query_row(
                        "SELECT manifest, media_type FROM images
                         WHERE repository = ?1 AND digest = ?2",
                        params![repository, digest],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?;
                let (manifest, media_type) =
                    row.ok_or_else(|| image_not_found(reference, repository))?;
                let accepted = &input.accepted_media_types;
                if !accepted.is_empty() && !accepted.iter().any(|m| m.as_str() == media_type) {
                    return Err(image_not_found(reference, repository).into());
                }
                // The bytes on disk are checked like bytes from ECR: corruption is refused.
                let actual = Digest::of(manifest.as_bytes());
                if actual.as_str() != digest {
                    return Err(RegistryError::DigestVerificationFailed {
                        expected: digest,
                        actual: actual.to_string(),
                    }
                    .into());
                }
                Ok(StoredImage {
                    registry_id,
                    repository: input.repository,
                    digest: actual,
                    tag: reference.tag().cloned(),
                    manifest: manifest.into(),
                    media_type,
                })
            })
            .await?;
        Ok(Fetched {
            image,
            cache: CacheStatus::Miss,
        })
    }
}

impl LocalRegistry {
    /// ECR's BatchDeleteImage semantics, id by id in one transaction: by digest the image and
    /// its tags go; by tag the tag goes, and the image with it when it was the last tag and no
    /// index refers to it; an image an index still refers to is `ImageReferencedByManifestList`.
    async fn delete(&self, input: DeleteImagesInput) -> Result<DeleteOutcome, RegistryError> {
        self.check_registry(input.registry_id.as_ref(), &input.repository)?;
        let registry_id = self.registry_id.clone();
        self.with_connection(move |connection| {
            let transaction =
                connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let repository = input.repository.as_str();
            require_repository(&transaction, repository, &registry_id)?;
            let mut outcome = DeleteOutcome::default();
            for reference in input.images {
                match delete_one(&transaction, repository, &reference)? {
                    Ok(deleted) => outcome.deleted.push(deleted),
                    Err((code, reason)) => outcome.failures.push(DeleteFailure {
                        image: Some(reference),
                        code: code.to_owned(),
                        reason,
                    }),
                }
            }
            transaction.commit()?;
            Ok(outcome)
        })
        .await
    }
}

impl LocalRegistry {
    /// What `tag` points at in the store now.
    async fn tag_digest(
        &self,
        repository: RepositoryKey,
        tag: Tag,
    ) -> Result<Option<Digest>, RegistryError> {
        self.check_registry(repository.registry_id.as_ref(), &repository.repository)?;
        let registry_id = self.registry_id.clone();
        self.with_connection(move |connection| {
            let name = repository.repository.as_str();
            require_repository(connection, name, &registry_id)?;
            let digest: Option<String> = connection
                .query_row(
                    "SELECT digest FROM tags WHERE repository = ?1 AND tag = ?2",
                    params![name, tag.as_str()],
                    |row| row.get(0),
                )
                .optional()?;
            Ok(digest.and_then(|d| Digest::parse(&d).ok()))
        })
        .await
    }

    /// ListImages over the store: one id per tag and the digest alone for an untagged image,
    /// in digest then tag order; the store's token is the offset of the next page.
    async fn list(&self, input: ListInput) -> Result<ListPage, RegistryError> {
        self.check_registry(input.registry_id.as_ref(), &input.repository)?;
        let registry_id = self.registry_id.clone();
        self.with_connection(move |connection| {
            let repository = input.repository.as_str();
            require_repository(connection, repository, &registry_id)?;
            let offset = page_offset(input.next_token.as_deref())?;
            let filter = match input.tag_status {
                TagStatus::Any => "",
                TagStatus::Tagged => "AND t.tag IS NOT NULL",
                TagStatus::Untagged => "AND t.tag IS NULL",
            };
            let mut rows = connection.prepare(&format!(
                "SELECT i.digest, t.tag FROM images i
                 LEFT JOIN tags t ON t.repository = i.repository AND t.digest = i.digest
                 WHERE i.repository = ?1 {filter}
                 ORDER BY i.digest, t.tag LIMIT ?2 OFFSET ?3"
            ))?;
            // One more than asked: whether a next page exists.
            let limit = i64::from(input.max_results) + 1;
            let mut ids: Vec<Deleted> = rows
                .query_map(params![repository, limit, offset], |row| {
                    let digest: String = row.get(0)?;
                    let tag: Option<String> = row.get(1)?;
                    Ok(Deleted {
                        digest: Digest::parse(&digest).ok(),
                        tag: tag.and_then(|t| Tag::parse(&t).ok()),
                    })
                })?
                .collect::<Result<_, _>>()?;
            let next_token = next_offset(&mut ids, input.max_results, offset);
            Ok(ListPage { ids, next_token })
        })
        .await
    }

    /// DescribeImages over the store: by ids (each must exist, or the call is ImageNotFound,
    /// as ECR answers), or a page of the listing by digest. The size is the layers' total as
    /// the manifest declares it (ECR's measure), else the manifest's own length.
    async fn describe(&self, input: DescribeInput) -> Result<DescribePage, RegistryError> {
        let listing = input.listing;
        self.check_registry(listing.registry_id.as_ref(), &listing.repository)?;
        let registry_id = self.registry_id.clone();
        let images = input.images;
        self.with_connection(move |connection| {
            let repository = listing.repository.as_str();
            require_repository(connection, repository, &registry_id)?;
            let (digests, next_token) = if images.is_empty() {
                let offset = page_offset(listing.next_token.as_deref())?;
                let filter = match listing.tag_status {
                    TagStatus::Any => "",
                    TagStatus::Tagged => {
                        "AND EXISTS (SELECT 1 FROM tags t WHERE t.repository = i.repository AND t.digest = i.digest)"
                    }
                    TagStatus::Untagged => {
                        "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repository = i.repository AND t.digest = i.digest)"
                    }
                };
                let mut rows = connection.prepare(&format!(
                    "SELECT i.digest FROM images i WHERE i.repository = ?1 {filter}
                     ORDER BY i.digest LIMIT ?2 OFFSET ?3"
                ))?;
                let limit = i64::from(listing.max_results) + 1;
                let mut digests: Vec<String> = rows
                    .query_map(params![repository, limit, offset], |row| row.get(0))?
                    .collect::<Result<_, _>>()?;
                let next = next_offset(&mut digests, listing.max_results, offset);
                (digests, next)
            } else {
                let mut digests = Vec::new();
                for reference in &images {
                    let digest = match (reference.tag(), reference.digest()) {
                        (Some(tag), _) => connection
                            .query_row(
                                "SELECT digest FROM tags WHERE repository = ?1 AND tag = ?2",
                                params![repository, tag.as_str()],
                                |row| row.get::<_, String>(0),
                            )
                            .optional()?,
                        (None, Some(digest)) => has_image(connection, repository, digest.as_str())?
                            .then(|| digest.as_str().to_owned()),
                        (None, None) => None,
                    };
                    let digest =
                        digest.ok_or_else(|| image_not_found(reference, repository))?;
                    if !digests.contains(&digest) {
                        digests.push(digest);
                    }
                }
                (digests, None)
            };
            let mut details = Vec::with_capacity(digests.len());
            for digest in digests {
                details.push(detail_of(connection, repository, &digest)?);
            }
            Ok(DescribePage {
                details,
                next_token,
            })
        })
        .await
    }
}

/// The offset a store token names; none is the first page.
fn page_offset(token: Option<&str>) -> Result<i64, Failure> {
    match token {
        None => Ok(0),
        Some(text) => text.parse::<i64>().map_err(|_| {
            RegistryError::InvalidParameter {
                field: "page_token",
                upstream: Upstream::message("the store's page token is not an offset"),
            }
            .into()
        }),
    }
}

/// Cuts `ids` to `max` and says where the next page starts, if there is one.
fn next_offset<T>(ids: &mut Vec<T>, max: u32, offset: i64) -> Option<String> {
    let more = ids.len() > max as usize;
    ids.truncate(max as usize);
    more.then(|| (offset + i64::from(max)).to_string())
}

/// One image's details.
fn detail_of(
    connection: &Connection,
    repository: &str,
    digest: &str,
) -> Result<ImageDetail, Failure> {
    let (manifest, media_type, pushed_at): (String, String, i64) = connection.query_row(
        "SELECT manifest, media_type, pushed_at FROM images WHERE repository = ?1 AND digest = ?2",
        params![repository, digest],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    let mut tags_query = connection
        .prepare("SELECT tag FROM tags WHERE repository = ?1 AND digest = ?2 ORDER BY tag")?;
    let tags: Vec<Tag> = tags_query
        .query_map(params![repository, digest], |row| row.get::<_, String>(0))?
        .filter_map(|tag| tag.ok().and_then(|t| Tag::parse(&t).ok()))
        .collect();
    #[derive(serde::Deserialize)]
    struct Sizes {
        #[serde(default)]
        layers: Vec<Sized>,
        config: Option<Config>,
    }
    #[derive(serde::Deserialize)]
    struct Sized {
        #[serde(default)]
        size: i64,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default, rename = "mediaType")]
        media_type: String,
    }
    let sizes = serde_json::from_str::<Sizes>(&manifest).ok();
    let layers: i64 = sizes
        .as_ref()
        .map_or(0, |s| s.layers.iter().map(|l| l.size).sum());
    let manifest_bytes = i64::try_from(manifest.len()).unwrap_or(i64::MAX);
    Ok(ImageDetail {
        digest: Digest::parse(digest)
            .map_err(|e| Failure::Registry(RegistryError::Other(Upstream::message(e.0))))?,
        tags,
        size_in_bytes: if layers > 0 { layers } else { manifest_bytes },
        pushed_at: Some(pushed_at),
        media_type,
        artifact_media_type: sizes
            .and_then(|s| s.config)
            .map(|c| c.media_type)
            .unwrap_or_default(),
    })
}

/// A per-id failure: ECR's code and reason.
type IdFailure = (&'static str, String);

/// Deletes one id inside `transaction`: what was deleted, or why not.
fn delete_one(
    transaction: &rusqlite::Transaction<'_>,
    repository: &str,
    reference: &ImageRef,
) -> Result<Result<Deleted, IdFailure>, rusqlite::Error> {
    let not_found = || {
        Err((
            "ImageNotFound",
            format!("Requested image {reference} not found in repository '{repository}'"),
        ))
    };
    let tagged: Option<String> = match reference.tag() {
        Some(tag) => {
            let found: Option<String> = transaction
                .query_row(
                    "SELECT digest FROM tags WHERE repository = ?1 AND tag = ?2",
                    params![repository, tag.as_str()],
                    |row| row.get(0),
                )
                .optional()?;
            let Some(found) = found else {
                return Ok(not_found());
            };
            if let Some(asked) = reference.digest()
                && asked.as_str() != found
            {
                return Ok(Err((
                    "ImageTagDoesNotMatchDigest",
                    format!("Tag '{tag}' points at {found}, not at {asked}"),
                )));
            }
            Some(found)
        }
        None => None,
    };
    let digest = match (&tagged, reference.digest()) {
        (Some(found), _) => found.clone(),
        (None, Some(digest)) => digest.as_str().to_owned(),
        (None, None) => return Ok(not_found()),
    };
    if !has_image(transaction, repository, &digest)? {
        return Ok(not_found());
    }
    let referenced = referenced_by_index(transaction, repository, &digest)?;
    let parsed = Digest::parse(&digest).ok();
    match reference.tag() {
        Some(tag) => {
            transaction.execute(
                "DELETE FROM tags WHERE repository = ?1 AND tag = ?2",
                params![repository, tag.as_str()],
            )?;
            let tags_left: i64 = transaction.query_row(
                "SELECT COUNT(*) FROM tags WHERE repository = ?1 AND digest = ?2",
                params![repository, digest],
                |row| row.get(0),
            )?;
            // The last tag takes the image along, unless an index still needs it.
            if tags_left == 0 && !referenced {
                delete_image(transaction, repository, &digest)?;
            }
            Ok(Ok(Deleted {
                digest: parsed,
                tag: Some(tag.clone()),
            }))
        }
        None if referenced => Ok(Err((
            "ImageReferencedByManifestList",
            format!(
                "Requested image {digest} is referenced by an index or manifest list in \
                 repository '{repository}'; delete the index first"
            ),
        ))),
        None => {
            delete_image(transaction, repository, &digest)?;
            Ok(Ok(Deleted {
                digest: parsed,
                tag: None,
            }))
        }
    }
}

/// Whether `repository` holds the image `digest`.
fn has_image(
    connection: &Connection,
    repository: &str,
    digest: &str,
) -> Result<bool, rusqlite::Error> {
    Ok(connection
        .query_row(
            "SELECT 1 FROM images WHERE repository = ?1 AND digest = ?2",
            params![repository, digest],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Removes an image and every tag on it.
fn delete_image(
    transaction: &rusqlite::Transaction<'_>,
    repository: &str,
    digest: &str,
) -> Result<(), rusqlite::Error> {
    transaction.execute(
        "DELETE FROM tags WHERE repository = ?1 AND digest = ?2",
        params![repository, digest],
    )?;
    transaction.execute(
        "DELETE FROM images WHERE repository = ?1 AND digest = ?2",
        params![repository, digest],
    )?;
    Ok(())
}

/// Whether an index or manifest list of `repository` lists `digest` among its manifests.
fn referenced_by_index(
    transaction: &rusqlite::Transaction<'_>,
    repository: &str,
    digest: &str,
) -> Result<bool, rusqlite::Error> {
    let mut indexes = transaction.prepare(
        "SELECT manifest, media_type FROM images
             WHERE repository = ?1 AND media_type IN (?2, ?3)",
    )?;
    let manifests = indexes.query_map(
        params![
            repository,
            media_types::OCI_INDEX,
            media_types::DOCKER_MANIFEST_LIST_V2
        ],
        |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
    )?;
    for row in manifests {
        let (manifest, media_type) = row?;
        if crate::domain::image::index_children(&media_type, &manifest)
            .iter()
            .any(|child| child == digest)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Registry for LocalRegistry {
    boxed_registry_methods!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immutable_patterns_match_names_and_whole_namespaces() {
        let dir = std::env::temp_dir().join(format!("local-patterns-{}", std::process::id()));
        let registry = LocalRegistry::open(&LocalSettings {
            data_dir: dir.clone(),
            registry_id: DEFAULT_REGISTRY_ID.to_owned(),
            immutable_repositories: vec!["base".to_owned(), "releases/*".to_owned()],
        })
        .unwrap();
        let immutable =
            |name: &str| registry.configured_immutable(&RepositoryName::parse(name).unwrap());
        assert!(immutable("base"));
        assert!(immutable("releases/app"));
        assert!(immutable("releases/team/app"));
        assert!(
            !immutable("releases"),
            "the namespace itself is not inside it"
        );
        assert!(!immutable("releasesx/app"));
        assert!(!immutable("base/app"), "an exact name is not a namespace");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A fresh directory under the system's temporary directory, for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("local-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn settings(dir: &Path) -> LocalSettings {
        LocalSettings {
            data_dir: dir.to_owned(),
            registry_id: DEFAULT_REGISTRY_ID.to_owned(),
            immutable_repositories: Vec::new(),
        }
    }

    /// What clients stored is readable by the service's user alone.
    #[test]
    fn the_store_is_private_to_its_user() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("modes");
        let _store = LocalRegistry::open(&settings(&dir)).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(DATABASE_FILE)), 0o600);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A second opener of the same directory is refused while the first lives, and admitted
    /// once it is gone.
    #[test]
    fn one_process_serves_a_store() {
        let dir = scratch("lock");
        let first = LocalRegistry::open(&settings(&dir)).unwrap();
        let second = LocalRegistry::open(&settings(&dir))
            .map(|_| ())
            .unwrap_err();
        assert!(second.to_string().contains("another process"), "{second}");
        drop(first);
        assert!(LocalRegistry::open(&settings(&dir)).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A store whose pages were damaged is refused at open with a clear message, rather than
    /// served with false NOT_FOUNDs.
    #[tokio::test]
    async fn a_damaged_store_is_refused_at_open() {
        let dir = scratch("damaged");
        {
            let store = LocalRegistry::open(&settings(&dir)).unwrap();
            for n in 0..200 {
                let text = format!(
                    r#"{{"mediaType":"a/b","n":{n},"pad":"{}"}}"#,
                    "x".repeat(500)
                );
                store
                    .put(PutImageInput {
                        registry_id: None,
                        repository: RepositoryName::parse("damaged").unwrap(),
                        manifest: crate::domain::image::Manifest::parse(text, None).unwrap(),
                        tag: Some(crate::domain::image::Tag::parse(&format!("t{n}")).unwrap()),
                    })
                    .await
                    .unwrap();
            }
            let connection = store.connection.lock().unwrap();
            connection
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .unwrap();
        }
        // Overwrite the middle of the file, past the header: b-tree pages, not the magic.
        let path = dir.join(DATABASE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle..middle + 8192].fill(0x5a);
        std::fs::write(&path, bytes).unwrap();
        let refused = LocalRegistry::open(&settings(&dir))
            .map(|_| ())
            .unwrap_err();
        assert!(refused.to_string().contains("integrity"), "{refused}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A full disk is its own error (RESOURCE_EXHAUSTED), not the retryable UNAVAILABLE.
    #[test]
    fn a_full_disk_is_not_unavailability() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(matches!(store_error(&full), RegistryError::StoreFull(_)));
        let io = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            None,
        );
        assert!(matches!(store_error(&io), RegistryError::Unavailable(_)));
    }
}
