//! Opening a ledger folder: what it holds, its locks, sled's own files and
//! the panics sled 0.34 raises on damaged ones.

use super::*;

/// What [`prepare_folder`] found.
pub(super) struct Folder {
    /// The folder did not exist and was created.
    pub(super) created: bool,
    /// It already held sled's `db` file.
    pub(super) had_db: bool,
}

/// Checks the folder before sled touches it, creating it when allowed.
/// Never lets sled write into a folder that holds anything but a sled
/// database with its `db` file, and creates a ledger only in a new or
/// empty folder: sled's files without `db` are a damaged ledger.
pub(super) fn prepare_folder(dir: &Path, mode: Mode) -> Result<Folder, StoreError> {
    let not_a_ledger = |reason: String| StoreError::NotALedger {
        dir: dir.to_path_buf(),
        reason,
    };
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if mode == Mode::ExistingOnly {
                return Err(not_a_ledger("the folder does not exist".into()));
            }
            fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating the ledger folder", e))?;
            Ok(Folder {
                created: true,
                had_db: false,
            })
        }
        Err(e) => Err(io_error(dir, "reading the ledger folder's metadata", e)),
        Ok(meta) if !meta.is_dir() => Err(not_a_ledger("it is a file, not a folder".into())),
        Ok(_) => {
            let mut names = Vec::new();
            for item in
                fs::read_dir(dir).map_err(|e| io_error(dir, "listing the ledger folder", e))?
            {
                let item = item.map_err(|e| io_error(dir, "listing the ledger folder", e))?;
                names.push(item.file_name());
            }
            let has = |name: &str| names.iter().any(|n| n == name);
            if has(SLED_DB_FILE) {
                // sled writes `conf` before it creates `db`: a `db` without
                // `conf` lost its `conf`, or was not made by sled; either
                // way sled would start afresh over it.
                if !has(SLED_CONF_FILE) {
                    return Err(StoreError::Unreadable {
                        dir: dir.to_path_buf(),
                        detail: "it holds a `db` file but no sled `conf` file (sled's configuration is missing, or this is no sled database)".into(),
                    });
                }
                return match fs::metadata(dir.join(SLED_DB_FILE)) {
                    Ok(meta) if meta.is_file() => Ok(Folder {
                        created: false,
                        had_db: true,
                    }),
                    _ => Err(not_a_ledger("its `db` is not a file".into())),
                };
            }
            // sled's files without `db`: a ledger that lost its main file
            // (or, far less likely, one whose creation was interrupted
            // inside sled's open, between `conf` and `db`). Never made a
            // fresh ledger: that would silently start over.
            let sled_files: Vec<String> = names
                .iter()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| {
                    n == SLED_CONF_FILE
                        || n == SLED_BLOBS_DIR
                        || n.starts_with(SLED_SNAPSHOT_PREFIX)
                })
                .collect();
            if !sled_files.is_empty() {
                let blobs = fs::read_dir(dir.join(SLED_BLOBS_DIR)).map_or(0, |items| items.count());
                return Err(StoreError::Unreadable {
                    dir: dir.to_path_buf(),
                    detail: format!(
                        "it holds sled's files ({}; {blobs} files in `blobs/`) but no `db` file: the ledger's main file is missing (if this folder never held events, its creation was interrupted: delete it and start again)",
                        sled_files.join(", ")
                    ),
                });
            }
            match mode {
                Mode::CreateIfNew if names.is_empty() => Ok(Folder {
                    created: false,
                    had_db: false,
                }),
                Mode::CreateIfNew => Err(not_a_ledger(format!(
                    "the folder holds other files (such as {:?}) and no ledger database; dealledger creates a ledger only in a new or empty folder",
                    names[0]
                ))),
                Mode::ExistingOnly if names.is_empty() => {
                    Err(not_a_ledger("the folder is empty".into()))
                }
                Mode::ExistingOnly => Err(not_a_ledger(
                    "the folder holds no ledger database (no sled `db` file)".into(),
                )),
            }
        }
    }
}

/// Takes an exclusive `flock` on the ledger folder itself, held as long as
/// the returned handle is open: [`StoreError::Locked`] when another store
/// holds it. sled's own lock on `db` says the same; the folder lock is
/// taken first, before sled touches anything in the folder (recovery,
/// scratch files), and stays held until sled has let its own go on drop.
pub(super) fn lock_folder(dir: &Path) -> Result<File, StoreError> {
    let folder =
        File::open(dir).map_err(|e| io_error(dir, "opening the ledger folder to lock it", e))?;
    match folder.try_lock() {
        Ok(()) => Ok(folder),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error(dir, "locking the ledger folder", e)),
    }
}

/// Opens sled with dealledger's settings, mapping its lock failure.
pub(super) fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_CAPACITY_BYTES)
        .use_compression(false)
        .flush_every_ms(None);
    remove_unfinished_sled_snapshots(dir)?;
    // sled 0.34 panics on some damaged files (a missing or cut blob: "tried
    // to serialize Uninitialized") instead of returning an error; a bad
    // folder must never crash the caller, nor print a panic.
    let opened = quietly(|| config.open());
    let unreadable = |detail: String| StoreError::Unreadable {
        dir: dir.to_path_buf(),
        detail,
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        // sled 0.34 `Config::try_lock`: fs2's try_lock_exclusive (flock) failed.
        Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
            Err(StoreError::Locked {
                dir: dir.to_path_buf(),
            })
        }
        Ok(Err(sled::Error::Unsupported(why))) => Err(unreadable(format!(
            "sled cannot use its configuration file `conf` with dealledger's settings: {why}"
        ))),
        Ok(Err(sled::Error::Corruption { at, .. })) => Err(unreadable(match at {
            Some(at) => format!("sled reports corruption while reading its files (at {at:?})"),
            None => "sled reports corruption while reading its files".to_owned(),
        })),
        Ok(Err(e)) => Err(sled_error(dir, "opening the sled database", e)),
        Err(panic) => Err(unreadable(format!(
            "sled failed reading its files: {}",
            panic_message(&*panic)
        ))),
    }
}

/// Deletes `snap.<lsn>.generating` files: sled 0.34 writes a snapshot of
/// its page table there, then renames it to `snap.<lsn>`, so one left
/// behind is unfinished (an open that failed on a full disk leaves an empty
/// one; so does a kill at the wrong moment). sled itself does not skip
/// them: it reads the name that sorts last, which is the unfinished file,
/// and reports corruption of a healthy ledger. Without them sled recovers
/// from the last finished snapshot and its log, as after any crash.
fn remove_unfinished_sled_snapshots(dir: &Path) -> Result<(), StoreError> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Ok(());
    };
    for item in listing {
        let item = item.map_err(|e| io_error(dir, "listing the ledger folder", e))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(SLED_SNAPSHOT_PREFIX) && name.ends_with(SLED_UNFINISHED_SNAPSHOT_SUFFIX)
        {
            fs::remove_file(item.path()).map_err(|e| {
                io_error(
                    dir,
                    format!("deleting sled's unfinished snapshot file {name}"),
                    e,
                )
            })?;
            tracing::warn!(dir = %dir.display(), file = %name, "deleted an unfinished sled snapshot file left by an interrupted open");
        }
    }
    Ok(())
}

/// The message of a caught panic.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}

/// An error while reading a just-opened ledger's metadata: damage, I/O or
/// sled failing mean the ledger cannot be opened ([`StoreError::Unreadable`]);
/// a full disk, a foreign database or a newer format keep their own error.
pub(super) fn unreadable_at_open(error: StoreError) -> StoreError {
    match error {
        StoreError::Corrupt { dir, detail, .. } => StoreError::Unreadable { dir, detail },
        StoreError::Io {
            dir,
            action,
            source,
        } => StoreError::Unreadable {
            detail: format!("{action}: {source}"),
            dir,
        },
        StoreError::Sled {
            dir,
            action,
            source,
        } => StoreError::Unreadable {
            detail: format!("{action}: sled error: {source}"),
            dir,
        },
        other => other,
    }
}

thread_local! {
    /// Set while [`quietly`] runs on this thread.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, with the panic hook silenced on this thread
/// only (other threads' panics are still reported). The hook is wrapped
/// once per process.
pub(super) fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET_PANICS.with(|quiet| quiet.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|quiet| quiet.set(false));
    result
}

/// Reads what an opened database holds.
pub(super) fn read_contents(
    dir: &Path,
    db: &sled::Db,
    tree: &sled::Tree,
) -> Result<Contents, StoreError> {
    let format = tree
        .get(meta_key(META_FORMAT))
        .map_err(|e| sled_error(dir, "reading the format version", e))?;
    let Some(format) = format else {
        let others: Vec<String> = db
            .tree_names()
            .iter()
            .filter(|n| {
                ![
                    TREE_NAME.as_bytes(),
                    SNAPSHOT_TREE_NAME.as_bytes(),
                    b"__sled__default",
                ]
                .contains(&n.as_ref())
            })
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        let default_empty = db.is_empty();
        if tree.is_empty() && others.is_empty() && default_empty {
            return Ok(Contents::Blank);
        }
        if !tree.is_empty() {
            return Err(corrupt(
                dir,
                None,
                "the ledger tree has data but no format version (metadata key `Mformat` missing)",
            ));
        }
        return Err(StoreError::NotALedger {
            dir: dir.to_path_buf(),
            reason: format!(
                "it is a sled database of something else (trees {others:?}, default tree {})",
                if default_empty { "empty" } else { "not empty" }
            ),
        });
    };
    let version = match <[u8; 4]>::try_from(format.as_ref()) {
        Ok(bytes) => u32::from_be_bytes(bytes),
        Err(_) => {
            return Err(corrupt(
                dir,
                None,
                format!("the format version is {} bytes, expected 4", format.len()),
            ));
        }
    };
    if version > STORE_FORMAT_VERSION {
        return Err(StoreError::UnsupportedFormat {
            dir: dir.to_path_buf(),
            found: version,
            supported: STORE_FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(corrupt(
            dir,
            None,
            "the format version is 0; versions start at 1",
        ));
    }
    if version < STORE_FORMAT_VERSION {
        return Err(StoreError::ObsoleteFormat {
            dir: dir.to_path_buf(),
            found: version,
            supported: STORE_FORMAT_VERSION,
        });
    }
    let topic = tree
        .get(meta_key(META_TOPIC))
        .map_err(|e| sled_error(dir, "reading the topic", e))?
        .ok_or_else(|| corrupt(dir, None, "the topic (metadata key `Mtopic`) is missing"))?;
    let topic = String::from_utf8(topic.to_vec())
        .map_err(|_| corrupt(dir, None, "the stored topic is not UTF-8"))?;
    Ok(Contents::Ledger { topic })
}

/// fsyncs the file or folder at `path`.
pub(super) fn sync_path(dir: &Path, path: &Path, what: &str) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(dir, format!("fsync of {what} ({})", path.display()), e))
}
