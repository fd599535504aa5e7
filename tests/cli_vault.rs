//! The vault through the CLI: creation, wrong keys, crash-safe rotation, nothing in clear.

use std::path::Path;
use std::time::Instant;

use capstan::secret::Secret;
use capstan::vault::{self, KeySource, SecretName, Vault};

use crate::util::*;

fn open_db(data: &DataDir) -> sled::Db {
    sled::open(data.data().join("db")).expect("open the data directory's database")
}

/// Fills a vault with `n` known secrets through the library; returns their values.
fn fill(db: &sled::Db, source: &KeySource, n: usize) -> Vec<(SecretName, Vec<u8>)> {
    let v = Vault::open(db, source).expect("open vault");
    let items: Vec<_> = (0..n)
        .map(|i| {
            (
                SecretName::new("test", &i.to_string(), "value"),
                format!("secret-value-{i:06}").into_bytes(),
            )
        })
        .collect();
    for (name, value) in &items {
        v.put(name, &Secret::new(value.clone())).unwrap();
    }
    v.flush().unwrap();
    items
}

fn assert_all_open(db: &sled::Db, source: &KeySource, items: &[(SecretName, Vec<u8>)]) {
    let v = Vault::open(db, source).expect("vault opens");
    assert_eq!(v.len(), items.len(), "no secret lost or duplicated");
    for (name, value) in items {
        assert_eq!(
            v.get(name).unwrap().expect("secret present").expose(),
            &value[..]
        );
    }
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
        let db = open_db(&data);
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
    let db = open_db(&data);
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
/// kills landed mid-operation (the new key did not open, or stale trees were left).
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
        let db = open_db(data);
        let stale = db
            .tree_names()
            .iter()
            .filter(|n| n.starts_with(b"secrets.g"))
            .count()
            > 1;
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
        if !finished && (stale || opened.len() < keys.len()) {
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
        let db = open_db(&data);
        fill(&db, &key, 5_000)
    };
    let mid_way = kill_repeatedly(&data, &["vault", "rotate-key"], &[], &[key], &items, 10);
    assert!(
        mid_way > 0,
        "no kill landed inside a rotation; the test proved nothing"
    );
}

#[test]
fn a_master_key_change_killed_at_any_moment_opens_with_the_old_or_the_new_key() {
    let data = DataDir::with_vault();
    let old = KeySource::KeyFile(data.data().join("vault.key"));
    let items = {
        let db = open_db(&data);
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
        Vault::open(&open_db(&data), &old).is_err(),
        "old key retired"
    );
    assert_all_open(&open_db(&data), &new, &items);

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
        let db = open_db(&data);
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

fn scan_dir(dir: &Path, needles: &[&[u8]]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
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
        let db = open_db(&data);
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
