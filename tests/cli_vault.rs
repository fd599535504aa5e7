//! The vault through the CLI: creation, wrong keys, crash-safe rotation, nothing in clear,
//! and nothing superseded left behind: after a passphrase change, a key rotation, a
//! compaction or a migration, no old header or ciphertext is readable in any file of the
//! data directory, and a process killed at any step loses nothing.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use capstan::secret::Secret;
use capstan::store::{PAUSE_ENV, PAUSE_STEPS, Store};
use capstan::vault::{self, KeySource, SecretName, Vault};

use crate::util::*;

pub fn open_store(data: &DataDir) -> Store {
    Store::open(&data.data()).expect("open the data directory")
}

/// Fills a vault with `n` known secrets through the library; returns their values.
fn fill(store: &Store, source: &KeySource, n: usize) -> Vec<(SecretName, Vec<u8>)> {
    let v = Vault::open(store, source).expect("open vault");
    let items: Vec<_> = (0..n)
        .map(|i| {
            (
                SecretName::new("test", &i.to_string(), "value"),
                format!("secret-value-{i:06}").into_bytes(),
            )
        })
        .collect();
    v.change(|c| {
        for (name, value) in &items {
            c.put(name, &Secret::new(value.clone()));
        }
    })
    .unwrap();
    items
}

fn assert_all_open(store: &Store, source: &KeySource, items: &[(SecretName, Vec<u8>)]) {
    let v = Vault::open(store, source).expect("vault opens");
    assert_eq!(v.len(), items.len(), "no secret lost or duplicated");
    for (name, value) in items {
        assert_eq!(
            v.get(name).unwrap().expect("secret present").expose(),
            &value[..]
        );
    }
}

/// What an offline reader of the data directory could use: the vault header as stored
/// (its JSON, the wrapped data key, the salt) and every sealed ciphertext.
pub fn stored_needles(store: &Store) -> Vec<Vec<u8>> {
    let stored = vault::read_stored(store).unwrap().expect("a vault");
    let mut needles = vec![
        serde_json::to_vec(&stored.header).unwrap(),
        stored.header.wrapped_data_key().as_bytes().to_vec(),
    ];
    if let vault::Protection::Passphrase { salt, .. } = &stored.header.protection {
        needles.push(salt.as_bytes().to_vec());
    }
    needles.extend(stored.sealed.into_values());
    needles
}

#[test]
fn init_writes_a_private_key_file_and_status_checks_the_key() {
    let data = DataDir::empty();
    let out = data.capstan(&["vault", "init"]);
    assert_success(&out, "vault init");
    let key = data.data().join("vault.key");
    assert!(stdout(&out).contains(&key.display().to_string()));
    let out = data.capstan(&["vault", "status"]);
    assert_success(&out, "vault status");
    let s = stdout(&out);
    assert!(
        s.contains("key file")
            && s.contains("key check:      ok")
            && s.contains("key generation: 1"),
        "{s}"
    );
    assert_failure_says(&data.capstan(&["vault", "init"]), "already exists");
}

#[test]
fn a_wrong_key_file_is_refused_with_wrong_vault_key() {
    let data = DataDir::with_vault();
    let other = data.path().join("other.key");
    vault::generate_key_file(&other).unwrap();
    let out = data
        .cmd()
        .args([
            "--vault-key-file",
            other.to_str().unwrap(),
            "device",
            "list",
        ])
        .output()
        .unwrap();
    assert_failure_says(&out, "wrong vault key");
}

#[test]
fn a_passphrase_vault_needs_the_right_passphrase_and_says_how_to_give_it() {
    let data = DataDir::empty();
    let out = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", "correct horse battery")
        .args(["vault", "init", "--passphrase"])
        .output()
        .unwrap();
    assert_success(&out, "vault init --passphrase");
    assert!(!data.data().join("vault.key").exists());
    let ok = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", "correct horse battery")
        .args(["vault", "status"])
        .output()
        .unwrap();
    assert_success(&ok, "status with the passphrase");
    assert!(
        stdout(&ok).contains("Argon2id, 64 MiB, 3 passes"),
        "{}",
        stdout(&ok)
    );
    let wrong = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", "wrong horse battery")
        .args(["device", "list"])
        .output()
        .unwrap();
    assert_failure_says(&wrong, "wrong vault key");
    let none = data.capstan(&["device", "list"]);
    assert_failure_says(&none, "CAPSTAN_VAULT_PASSPHRASE");
}

#[test]
fn change_passphrase_keeps_every_secret() {
    let data = DataDir::empty();
    let old = "old passphrase 1";
    assert_success(
        &data
            .cmd()
            .env("CAPSTAN_VAULT_PASSPHRASE", old)
            .args(["vault", "init", "--passphrase"])
            .output()
            .unwrap(),
        "init",
    );
    let items = {
        let db = open_store(&data);
        fill(
            &db,
            &KeySource::Passphrase(Secret::from_str_owned(old.into())),
            20,
        )
    };
    let out = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", old)
        .env("CAPSTAN_VAULT_NEW_PASSPHRASE", "new passphrase 2")
        .args(["vault", "change-passphrase"])
        .output()
        .unwrap();
    assert_success(&out, "change-passphrase");
    let db = open_store(&data);
    assert!(
        Vault::open(
            &db,
            &KeySource::Passphrase(Secret::from_str_owned(old.into()))
        )
        .is_err()
    );
    assert_all_open(
        &db,
        &KeySource::Passphrase(Secret::from_str_owned("new passphrase 2".into())),
        &items,
    );
}

/// Kills `capstan ARGS` at spread-out moments of its run and checks after each kill that
/// the vault opens with the old or the new key and holds every secret. Returns how many
/// kills landed before the process ended (the new key did not open, an interrupted
/// change left its files, or it simply had not finished); [`kill_at_every_step`] aims
/// at each step precisely.
fn kill_repeatedly(
    data: &DataDir,
    args: &[&str],
    envs: &[(&str, &str)],
    keys: &[KeySource],
    items: &[(SecretName, Vec<u8>)],
    rounds: usize,
) -> usize {
    // Time one complete run to spread the kills across it.
    let t = Instant::now();
    let out = data
        .cmd()
        .envs(envs.iter().copied())
        .args(args)
        .output()
        .unwrap();
    assert_success(&out, "an uninterrupted run");
    let full = t.elapsed();
    let mut mid_way = 0;
    for round in 0..rounds {
        let delay = full.mul_f64((round as f64 + 0.5) / rounds as f64);
        let mut child = data
            .cmd()
            .envs(envs.iter().copied())
            .args(args)
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        let stale = ["vault.json.new", "vault.json.old"]
            .iter()
            .any(|f| data.data().join(f).exists());
        let db = open_store(data);
        let opened: Vec<usize> = keys
            .iter()
            .enumerate()
            .filter(|(_, k)| Vault::open(&db, k).is_ok())
            .map(|(i, _)| i)
            .collect();
        assert!(
            !opened.is_empty(),
            "round {round} (killed after {delay:?}): the vault opens with neither the old nor the new key"
        );
        assert_all_open(&db, &keys[opened[0]], items);
        if !finished || stale || opened.len() < keys.len() {
            mid_way += 1;
        }
    }
    mid_way
}

#[test]
fn a_rotation_killed_at_any_moment_leaves_a_vault_that_opens_with_nothing_lost() {
    let data = DataDir::with_vault();
    let key = KeySource::KeyFile(data.data().join("vault.key"));
    let items = {
        let db = open_store(&data);
        fill(&db, &key, 5_000)
    };
    let mid_way = kill_repeatedly(&data, &["vault", "rotate-key"], &[], &[key], &items, 10);
    assert!(
        mid_way > 0,
        "no kill landed before a rotation ended; the test proved nothing"
    );
}

#[test]
fn a_master_key_change_killed_at_any_moment_opens_with_the_old_or_the_new_key() {
    let data = DataDir::with_vault();
    let old = KeySource::KeyFile(data.data().join("vault.key"));
    let items = {
        let db = open_store(&data);
        fill(&db, &old, 5_000)
    };
    // Each run re-seals everything and switches to a freshly generated key file.
    let new_key = data.path().join("new.key");
    let args = [
        "vault",
        "rotate-key",
        "--new-key-file",
        new_key.to_str().unwrap(),
    ];
    let t = Instant::now();
    let out = data.cmd().args(args).output().unwrap();
    assert_success(&out, "rotate-key --new-key-file");
    let full = t.elapsed();
    let new = KeySource::KeyFile(new_key.clone());
    assert!(
        Vault::open(&open_store(&data), &old).is_err(),
        "old key retired"
    );
    assert_all_open(&open_store(&data), &new, &items);

    // Now kill the switch back to another new key at spread-out moments.
    let mut mid_way = 0;
    let mut current = new_key;
    for round in 0..8 {
        let next = data.path().join(format!("k{round}.key"));
        let mut child = data
            .cmd()
            .args([
                "--vault-key-file",
                current.to_str().unwrap(),
                "vault",
                "rotate-key",
                "--new-key-file",
                next.to_str().unwrap(),
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64((round as f64 + 0.5) / 8.0));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        let db = open_store(&data);
        let with_current = Vault::open(&db, &KeySource::KeyFile(current.clone())).is_ok();
        let with_next =
            next.exists() && Vault::open(&db, &KeySource::KeyFile(next.clone())).is_ok();
        assert!(
            with_current ^ with_next,
            "round {round}: exactly one key opens (current {with_current}, next {with_next})"
        );
        let opened = if with_next {
            next.clone()
        } else {
            current.clone()
        };
        assert_all_open(&db, &KeySource::KeyFile(opened.clone()), &items);
        if !finished && with_current {
            mid_way += 1;
        }
        current = opened;
    }
    assert!(
        mid_way > 0,
        "no kill landed before the commit; the test proved nothing"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                files.push((p, bytes));
            }
        }
    }
    files
}

fn scan_dir(dir: &Path, needles: &[&[u8]]) -> Vec<String> {
    let mut hits = Vec::new();
    for (p, bytes) in files_under(dir) {
        for n in needles {
            if contains(&bytes, n) {
                hits.push(format!(
                    "{} contains {:?}",
                    p.display(),
                    String::from_utf8_lossy(n)
                ));
            }
        }
    }
    hits
}

#[test]
fn no_secret_appears_in_the_clear_in_any_file_of_the_data_directory() {
    let data = DataDir::with_vault();
    let infra = Infra::get();
    let password = "pw-Zq8#marker-7731";
    let out = data.capstan_stdin(
        &[
            "device",
            "add",
            "pw",
            "--kind",
            "ssh",
            "--host",
            "127.0.0.1",
            "--user",
            "u",
            "--password-stdin",
        ],
        password.as_bytes(),
    );
    assert_success(&out, "add with password");
    let key_path = infra.path("SSH_KEY_ED25519");
    let out = data.capstan(&[
        "device",
        "add",
        "k",
        "--kind",
        "ssh",
        "--host",
        "127.0.0.1",
        "--user",
        "u",
        "--ssh-key-file",
        key_path.to_str().unwrap(),
    ]);
    assert_success(&out, "add with key");
    let key_text = std::fs::read_to_string(&key_path).unwrap();
    // A distinctive line from the middle of the private key.
    let key_line = key_text.lines().nth(3).expect("key has lines").to_string();
    let tls_key = std::fs::read_to_string(infra.path("TLS_KEY")).unwrap();
    let tls_line = tls_key.lines().nth(2).unwrap().to_string();
    let out = data.capstan(&[
        "device",
        "add",
        "t",
        "--kind",
        "tls",
        "--host",
        "127.0.0.1",
        "--tls-ca",
        infra.var("TLS_CA"),
        "--tls-cert",
        infra.var("TLS_CERT"),
        "--tls-key",
        infra.var("TLS_KEY"),
    ]);
    assert_success(&out, "add tls");
    let items = {
        let db = open_store(&data);
        fill(&db, &KeySource::KeyFile(data.data().join("vault.key")), 100)
    };
    let mut needles: Vec<Vec<u8>> = vec![
        password.as_bytes().to_vec(),
        key_line.into_bytes(),
        tls_line.into_bytes(),
    ];
    needles.extend(items.iter().map(|(_, v)| v.clone()));
    let refs: Vec<&[u8]> = needles.iter().map(|n| &n[..]).collect();
    let hits = scan_dir(&data.data(), &refs);
    assert!(
        hits.is_empty(),
        "secrets in the clear:\n{}",
        hits.join("\n")
    );
    // The scanner does find what is stored in clear (a device's host), so the empty
    // result above means something.
    assert!(!scan_dir(&data.data(), &[b"127.0.0.1".as_slice()]).is_empty());
}

/// Every file under `dir` that holds one of `needles`, raw or hex-encoded (the vault file
/// stores ciphertexts as hex, sled stores them raw).
pub fn files_holding(dir: &Path, needles: &[Vec<u8>]) -> Vec<String> {
    let forms: Vec<(usize, Vec<u8>)> = needles
        .iter()
        .enumerate()
        .flat_map(|(i, n)| [(i, n.clone()), (i, hex::encode(n).into_bytes())])
        .collect();
    let mut hits = Vec::new();
    for (p, bytes) in files_under(dir) {
        for (i, form) in &forms {
            if contains(&bytes, form) {
                hits.push(format!("{} holds needle #{i}", p.display()));
            }
        }
    }
    hits
}

/// Runs `capstan ARGS` with [`PAUSE_ENV`] set to `step`, and SIGKILLs it once it says it
/// stopped there. Returns whether it got there (false: it finished without passing it).
pub fn kill_at(data: &DataDir, args: &[&str], envs: &[(&str, &str)], step: &str) -> bool {
    let mut child = data
        .cmd()
        .envs(envs.iter().copied())
        .env(PAUSE_ENV, step)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capstan");
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = Vec::new();
    let wanted = format!("capstan: paused at {step}");
    for line in stderr.lines() {
        let line = line.unwrap();
        if line == wanted {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        said.push(line);
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "capstan {args:?} failed before reaching {step}: {}",
        said.join("\n")
    );
    false
}

fn leftovers(data: &DataDir) -> Vec<String> {
    std::fs::read_dir(data.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| {
            n.ends_with(".new")
                || n.ends_with(".old")
                || n.ends_with(".next")
                || n.ends_with(".compact")
        })
        .collect()
}

fn passphrase(p: &str) -> KeySource {
    KeySource::Passphrase(Secret::from_str_owned(p.into()))
}

#[test]
fn change_passphrase_leaves_no_old_header_and_the_old_passphrase_opens_nothing() {
    let data = DataDir::empty();
    let (old, new) = ("old passphrase 1", "new passphrase 2");
    let init = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", old)
        .args(["vault", "init", "--passphrase"])
        .output()
        .unwrap();
    assert_success(&init, "init");
    let (items, before) = {
        let store = open_store(&data);
        let items = fill(&store, &passphrase(old), 20);
        // Replace one secret, so the log of an older layout would hold two versions.
        let v = Vault::open(&store, &passphrase(old)).unwrap();
        v.put(&items[0].0, &Secret::new(items[0].1.clone()))
            .unwrap();
        let header = vault::read_stored(&store).unwrap().unwrap().header;
        let mut needles = vec![
            serde_json::to_vec(&header).unwrap(),
            header.wrapped_data_key().as_bytes().to_vec(),
        ];
        if let vault::Protection::Passphrase { salt, .. } = &header.protection {
            needles.push(salt.as_bytes().to_vec());
        }
        (items, needles)
    };
    assert!(
        !files_holding(&data.data(), &before).is_empty(),
        "the scan finds the live header"
    );
    let out = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", old)
        .env("CAPSTAN_VAULT_NEW_PASSPHRASE", new)
        .args(["vault", "change-passphrase"])
        .output()
        .unwrap();
    assert_success(&out, "change-passphrase");
    let hits = files_holding(&data.data(), &before);
    assert!(
        hits.is_empty(),
        "the old header is still readable:\n{}",
        hits.join("\n")
    );
    let store = open_store(&data);
    assert!(matches!(
        Vault::open(&store, &passphrase(old)),
        Err(vault::VaultError::WrongKey(_))
    ));
    assert_all_open(&store, &passphrase(new), &items);
    assert_eq!(leftovers(&data), Vec::<String>::new());
}

#[test]
fn rotate_key_leaves_no_superseded_ciphertext_or_header_and_the_old_key_opens_nothing() {
    let data = DataDir::with_vault();
    let key = KeySource::KeyFile(data.data().join("vault.key"));
    let (items, mut before) = {
        let store = open_store(&data);
        let items = fill(&store, &key, 50);
        (items, stored_needles(&store))
    };
    assert_success(&data.capstan(&["vault", "rotate-key"]), "rotate-key");
    let hits = files_holding(&data.data(), &before);
    assert!(
        hits.is_empty(),
        "superseded records readable:\n{}",
        hits.join("\n")
    );
    assert_all_open(&open_store(&data), &key, &items);

    // Replacing the master key too: the old key file opens nothing left in the directory.
    before.extend(stored_needles(&open_store(&data)));
    let new_key = data.path().join("new.key");
    let out = data.capstan(&[
        "vault",
        "rotate-key",
        "--new-key-file",
        new_key.to_str().unwrap(),
    ]);
    assert_success(&out, "rotate-key --new-key-file");
    let hits = files_holding(&data.data(), &before);
    assert!(
        hits.is_empty(),
        "superseded records readable:\n{}",
        hits.join("\n")
    );
    let store = open_store(&data);
    assert!(matches!(
        Vault::open(&store, &key),
        Err(vault::VaultError::WrongKey(_))
    ));
    assert_all_open(&store, &KeySource::KeyFile(new_key), &items);
}

/// Checks the invariants after a kill: the vault opens with one of `keys` and holds
/// (at least) `items`; once the store has opened (and tidied), nothing of `superseded` that is not
/// live again is left, and no file of an interrupted change remains. Returns the index
/// of the key that opened.
fn assert_recovered(
    data: &DataDir,
    keys: &[KeySource],
    items: &[(SecretName, Vec<u8>)],
    before: &[Vec<u8>],
    what: &str,
) -> usize {
    let store = open_store(data);
    let opened = keys
        .iter()
        .position(|k| Vault::open(&store, k).is_ok())
        .unwrap_or_else(|| panic!("{what}: the vault opens with neither the old nor the new key"));
    assert_all_open_among(&store, &keys[opened], items);
    let live = stored_needles(&store);
    drop(store);
    let superseded: Vec<Vec<u8>> = before
        .iter()
        .filter(|n| !live.contains(n))
        .cloned()
        .collect();
    let hits = files_holding(&data.data(), &superseded);
    assert!(
        hits.is_empty(),
        "{what}: superseded records readable:\n{}",
        hits.join("\n")
    );
    assert_eq!(leftovers(data), Vec::<String>::new(), "{what}: leftovers");
    opened
}

#[test]
fn a_key_rotation_killed_at_every_step_opens_with_the_old_or_the_new_key_and_forgets_the_old() {
    let data = DataDir::with_vault();
    let mut current = data.data().join("vault.key");
    let items = fill(
        &open_store(&data),
        &KeySource::KeyFile(current.clone()),
        200,
    );
    let mut landed_after_commit = 0;
    for (round, step) in PAUSE_STEPS
        .iter()
        .filter(|s| s.starts_with("vault-"))
        .enumerate()
    {
        let before = stored_needles(&open_store(&data));
        let next = data.path().join(format!("k{round}.key"));
        let args = [
            "--vault-key-file",
            current.to_str().unwrap(),
            "vault",
            "rotate-key",
            "--new-key-file",
            next.to_str().unwrap(),
        ];
        assert!(
            kill_at(&data, &args, &[], step),
            "rotate-key never reached {step}"
        );
        let keys = [
            KeySource::KeyFile(current.clone()),
            KeySource::KeyFile(next.clone()),
        ];
        let opened = assert_recovered(&data, &keys, &items, &before, &format!("killed at {step}"));
        if opened == 1 {
            landed_after_commit += 1;
            current = next;
        }
    }
    // Two steps come before the commit (the rename) and two after it.
    assert_eq!(landed_after_commit, 2);
}

#[test]
fn a_passphrase_change_killed_at_every_step_opens_with_the_old_or_the_new_passphrase() {
    let data = DataDir::empty();
    let passphrases = [
        "passphrase number 0",
        "passphrase number 1",
        "passphrase number 2",
        "passphrase number 3",
        "passphrase number 4",
    ];
    let init = data
        .cmd()
        .env("CAPSTAN_VAULT_PASSPHRASE", passphrases[0])
        .args(["vault", "init", "--passphrase"])
        .output()
        .unwrap();
    assert_success(&init, "init");
    let items = fill(&open_store(&data), &passphrase(passphrases[0]), 30);
    let mut current = 0;
    for (round, step) in PAUSE_STEPS
        .iter()
        .filter(|s| s.starts_with("vault-"))
        .enumerate()
    {
        let before = stored_needles(&open_store(&data));
        let next = round + 1;
        let envs = [
            ("CAPSTAN_VAULT_PASSPHRASE", passphrases[current]),
            ("CAPSTAN_VAULT_NEW_PASSPHRASE", passphrases[next]),
        ];
        assert!(
            kill_at(&data, &["vault", "change-passphrase"], &envs, step),
            "never reached {step}"
        );
        let keys = [
            passphrase(passphrases[current]),
            passphrase(passphrases[next]),
        ];
        if assert_recovered(&data, &keys, &items, &before, &format!("killed at {step}")) == 1 {
            current = next;
        }
    }
    assert_eq!(current, 4, "the last two kills came after the commit");
}

/// A vault with secrets and a database with devices (one removed), a token and a tree of
/// other records; returns the secrets and the removed device's host.
fn populated(data: &DataDir) -> Vec<(SecretName, Vec<u8>)> {
    for (name, host) in [
        ("kept", "kept-host.example"),
        ("gone", "removed-host-marker.example"),
    ] {
        let out = data.capstan_stdin(
            &[
                "device",
                "add",
                name,
                "--kind",
                "ssh",
                "--host",
                host,
                "--user",
                "u",
                "--password-stdin",
            ],
            b"device password",
        );
        assert_success(&out, "device add");
    }
    assert_success(&data.capstan(&["device", "rm", "gone"]), "device rm");
    assert_success(
        &data.capstan(&["token", "create", "survivor"]),
        "token create",
    );
    let store = open_store(data);
    let items = fill(
        &store,
        &KeySource::KeyFile(data.data().join("vault.key")),
        100,
    );
    let t = store.tree("compaction-test").unwrap();
    for i in 0..3_000u32 {
        t.insert(i.to_be_bytes(), format!("record {i}").into_bytes())
            .unwrap();
    }
    store.flush().unwrap();
    items
}

fn assert_everything_survived(data: &DataDir, items: &[(SecretName, Vec<u8>)]) {
    {
        let store = open_store(data);
        let key = KeySource::KeyFile(data.data().join("vault.key"));
        let v = Vault::open(&store, &key).unwrap();
        // The kept device's password, and the test secrets.
        assert_eq!(v.len(), items.len() + 1, "no secret lost");
        drop(v);
        assert_all_open_among(&store, &key, items);
        let t = store.tree("compaction-test").unwrap();
        assert_eq!(t.len(), 3_000, "no record lost");
        assert_eq!(
            &t.get(2_999u32.to_be_bytes()).unwrap().unwrap()[..],
            b"record 2999"
        );
    }
    let list = stdout(&data.capstan(&["device", "list"]));
    assert!(list.contains("kept") && !list.contains("gone"), "{list}");
    let tokens = stdout(&data.capstan(&["token", "list"]));
    assert!(tokens.contains("survivor"), "{tokens}");
}

fn assert_all_open_among(store: &Store, source: &KeySource, items: &[(SecretName, Vec<u8>)]) {
    let v = Vault::open(store, source).expect("vault opens");
    for (name, value) in items {
        assert_eq!(
            v.get(name).unwrap().expect("secret present").expose(),
            &value[..]
        );
    }
}

#[test]
fn vault_compact_clears_superseded_database_records_and_keeps_every_live_one() {
    let data = DataDir::with_vault();
    let items = populated(&data);
    let removed = vec![b"removed-host-marker.example".to_vec()];
    assert!(
        !files_holding(&data.data(), &removed).is_empty(),
        "sled keeps the removed device's record in its log (else this test proves nothing)"
    );
    let before = stored_needles(&open_store(&data));
    let out = data.capstan(&["vault", "compact"]);
    assert_success(&out, "vault compact");
    assert!(
        stdout(&out).contains("vault rewritten (101 secrets)"),
        "{}",
        stdout(&out)
    );
    let hits = files_holding(&data.data(), &removed);
    assert!(hits.is_empty(), "removed record left:\n{}", hits.join("\n"));
    assert_eq!(leftovers(&data), Vec::<String>::new());
    // The vault file was rewritten, its records unchanged and live.
    assert_eq!(stored_needles(&open_store(&data)), before);
    assert_everything_survived(&data, &items);
}

#[test]
fn a_compaction_killed_at_every_step_loses_nothing() {
    let data = DataDir::with_vault();
    let items = populated(&data);
    for step in PAUSE_STEPS {
        assert!(
            kill_at(&data, &["vault", "compact"], &[], step),
            "vault compact never reached {step}"
        );
        let key = [KeySource::KeyFile(data.data().join("vault.key"))];
        assert_recovered(&data, &key, &[], &[], &format!("killed at {step}"));
        assert_everything_survived(&data, &items);
    }
}

/// Turns a data directory into the layout of versions that kept the vault in sled
/// (tree `vault` with the header, `secrets.g<N>` with the sealed records), with a
/// replaced record still in the log. Returns the raw sealed bytes, old and live.
fn make_legacy(data: &DataDir) -> Vec<Vec<u8>> {
    let stored = vault::read_stored(&open_store(data)).unwrap().unwrap();
    std::fs::remove_file(data.data().join("vault.json")).unwrap();
    // sled finishes closing the store's database in the background: wait for its lock.
    let started = Instant::now();
    let db = loop {
        match sled::open(data.data().join("db")) {
            Ok(db) => break db,
            Err(e) if started.elapsed() < std::time::Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open the database: {e}"),
        }
    };
    db.open_tree("vault")
        .unwrap()
        .insert("header", serde_json::to_vec(&stored.header).unwrap())
        .unwrap();
    let t = db
        .open_tree(format!("secrets.g{}", stored.header.generation))
        .unwrap();
    let (first, first_sealed) = stored.sealed.iter().next().unwrap();
    let mut replaced = first_sealed.clone();
    *replaced.last_mut().unwrap() ^= 0x5a;
    t.insert(first.as_bytes(), replaced.clone()).unwrap();
    db.flush().unwrap();
    for (k, v) in &stored.sealed {
        t.insert(k.as_bytes(), v.clone()).unwrap();
    }
    db.open_tree("compaction-test")
        .unwrap()
        .insert(b"k", b"kept record".to_vec())
        .unwrap();
    db.flush().unwrap();
    let mut raw: Vec<Vec<u8>> = stored.sealed.into_values().collect();
    raw.push(replaced);
    raw
}

#[test]
fn a_data_directory_of_an_older_version_migrates_at_open_even_when_killed_at_every_step() {
    for step in PAUSE_STEPS.iter().copied().chain([""]) {
        let data = DataDir::with_vault();
        let key = KeySource::KeyFile(data.data().join("vault.key"));
        let items = fill(&open_store(&data), &key, 40);
        let raw = make_legacy(&data);
        assert!(!files_holding(&data.data(), &raw[raw.len() - 1..]).is_empty());
        let reached = kill_at(&data, &["vault", "status"], &[], step);
        // A migration writes the vault file fresh: there is no old one to zero.
        assert_eq!(
            reached,
            !step.is_empty() && step != "vault-old-zeroed",
            "{step}"
        );
        {
            let store = open_store(&data);
            for n in store.db.tree_names() {
                assert!(
                    &n[..] != b"vault" && !n.starts_with(b"secrets.g"),
                    "{step}: {n:?} left"
                );
            }
            assert_all_open(&store, &key, &items);
            let t = store.tree("compaction-test").unwrap();
            assert_eq!(&t.get(b"k").unwrap().unwrap()[..], b"kept record", "{step}");
        }
        // Not one raw sealed record is left in the database's files: the live ones are
        // in the vault file (as hex), the replaced one nowhere.
        let raw_hits: Vec<String> = files_holding(&data.data(), &raw)
            .into_iter()
            .filter(|h| !h.contains("vault.json"))
            .collect();
        assert!(raw_hits.is_empty(), "{step}: {}", raw_hits.join("\n"));
        let replaced = files_holding(&data.data(), &raw[raw.len() - 1..]);
        assert!(replaced.is_empty(), "{step}: {}", replaced.join("\n"));
        assert_eq!(leftovers(&data), Vec::<String>::new(), "{step}");
    }
}

/// The sealed bytes of the secret `name` as the vault file holds them, read without the
/// store's lock (a running engine holds it).
fn sealed_in_file(data: &DataDir, name: &str) -> Option<Vec<u8>> {
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.data().join("vault.json")).unwrap()).unwrap();
    file["secrets"][name]
        .as_str()
        .map(|h| hex::decode(h).unwrap())
}

#[test]
fn a_hook_secret_rotated_retired_or_removed_through_the_engine_leaves_no_copy() {
    let data = DataDir::with_vault();
    let src = data.path().join("hook-plugin");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(plugin::wasm("trivial"), src.join("plugin.wasm")).unwrap();
    std::fs::write(
        src.join("plugin.toml"),
        "name = \"forgets\"\nversion = \"1\"\n[[triggers.webhook]]\nname = \"f\"\nauth = \"bearer\"\n",
    )
    .unwrap();
    let out = data.capstan(&[
        "plugin",
        "install",
        src.join("plugin.wasm").to_str().unwrap(),
    ]);
    assert_success(&out, "plugin install");
    let first = sealed_in_file(&data, "hook/f/current").expect("the hook's secret");
    let server = Server::start(&data);

    assert_success(&data.capstan(&["hook", "rotate", "f"]), "hook rotate");
    let current = sealed_in_file(&data, "hook/f/current").unwrap();
    let previous = sealed_in_file(&data, "hook/f/previous").expect("the previous secret");
    let hits = files_holding(&data.data(), std::slice::from_ref(&first));
    assert!(
        hits.is_empty(),
        "rotated-away record left:\n{}",
        hits.join("\n")
    );

    assert_success(&data.capstan(&["hook", "retire", "f"]), "hook retire");
    assert_eq!(sealed_in_file(&data, "hook/f/previous"), None);
    let hits = files_holding(&data.data(), std::slice::from_ref(&previous));
    assert!(hits.is_empty(), "retired secret left:\n{}", hits.join("\n"));

    assert_success(
        &data.capstan(&["plugin", "remove", "forgets"]),
        "plugin remove",
    );
    let hits = files_holding(&data.data(), std::slice::from_ref(&current));
    assert!(
        hits.is_empty(),
        "removed hook's secret left:\n{}",
        hits.join("\n")
    );
    // Compaction on demand needs the engine stopped, and says so.
    assert_failure_says(
        &data.capstan(&["vault", "compact"]),
        "is `capstan serve` running?",
    );
    assert!(server.stop().success());
    assert_success(&data.capstan(&["vault", "compact"]), "compact once stopped");
    let store = open_store(&data);
    let v = Vault::open(&store, &KeySource::KeyFile(data.data().join("vault.key"))).unwrap();
    assert!(
        !v.names().unwrap().iter().any(|n| n.starts_with("hook/")),
        "{:?}",
        v.names()
    );
}
