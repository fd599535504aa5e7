//! A plugin that misbehaves on purpose, for the engine's containment tests. The manual
//! input picks the misbehaviour (`mode` or `mode:argument`); each must be stopped or
//! refused with a recorded reason while the engine goes on serving.
//!
//! | mode | what it tries |
//! |---|---|
//! | `spin` | an endless loop |
//! | `hog` | allocating memory until something stops it |
//! | `recurse` | unbounded recursion (on the WebAssembly stack) |
//! | `recurse-shadow` | unbounded recursion through the shadow stack in linear memory |
//! | `trap` | a panic |
//! | `flood` | megabytes of stdout and stderr, and a hundred thousand log records |
//! | `fs` | reading, writing and listing files |
//! | `net` | TCP and UDP sockets, name lookup |
//! | `env` | environment variables, arguments, working directory |
//! | `device:NAME` | listing containers on a device outside its scope |
//! | `container:DEVICE/NAME` | restarting a container (outside its container scope, or denied by its policy) |
//! | `calls` | more host calls than its limit allows |
//! | `fields:CALLS:N` | `CALLS` log records with `N` empty fields each |
//! | `records:N` | `N` empty log records |
//! | `outcome:MIB` | an outcome of `MIB` MiB |
//! | `denials:N:LEN` | `N` calls naming a device of `LEN` bytes outside its scope |
//! | `state:N:SIZE[:FROM]` | `N` state keys (numbered from `FROM`) of `SIZE`-byte values; reports how many were stored |
//! | `ok` | nothing wrong: returns at once |

use std::hint::black_box;

use capstan_sdk::bindings::capstan::plugin::host;
use capstan_sdk::prelude::*;

struct Hostile;

/// A mode's numeric argument (0 when it is not a number).
fn number(text: &str) -> usize {
    text.parse().unwrap_or(0)
}

/// Recursion on the WebAssembly stack (no address-taken locals).
fn recurse(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return 0;
    }
    recurse(depth + 1).wrapping_add(black_box(1))
}

/// Recursion that also uses the shadow stack in linear memory.
#[allow(unconditional_recursion)]
fn recurse_shadow(depth: u64, pad: [u64; 16]) -> u64 {
    let mut local = pad;
    local[(depth % 16) as usize] = depth;
    black_box(&mut local);
    recurse_shadow(depth + 1, local) + local[0]
}

fn attempt<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> String {
    match r {
        Ok(_) => format!("{what}: SUCCEEDED"),
        Err(e) => format!("{what}: refused ({e})"),
    }
}

impl Plugin for Hostile {
    fn run(event: Event) -> Result<Outcome, Error> {
        let input = event.input();
        let (mode, arg) = input.split_once(':').unwrap_or((input.as_str(), ""));
        match mode {
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = black_box(x.wrapping_add(1));
                }
            }
            "hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 4 * 1024 * 1024]);
                    black_box(&hoard);
                }
            }
            "recurse" => Ok(Outcome::new(format!("{}", recurse(0)))),
            "recurse-shadow" => Ok(Outcome::new(format!("{}", recurse_shadow(0, [0; 16])))),
            "trap" => panic!("hostile plugin panics on purpose"),
            "flood" => {
                let line = "x".repeat(1023);
                for _ in 0..4096 {
                    println!("{line}");
                    eprintln!("{line}");
                }
                for i in 0..100_000 {
                    log::info(&format!("flood record {i}"));
                }
                Ok(Outcome::new("flooded"))
            }
            "fs" => {
                let results = [
                    attempt("read /etc/passwd", std::fs::read_to_string("/etc/passwd")),
                    attempt("read ./plugin.toml", std::fs::read_to_string("plugin.toml")),
                    attempt(
                        "create /tmp/capstan-hostile",
                        std::fs::write("/tmp/capstan-hostile", b"x"),
                    ),
                    attempt("list /", std::fs::read_dir("/")),
                ];
                Ok(Outcome::new(results.join("; ")))
            }
            "net" => {
                let results = [
                    attempt(
                        "tcp connect 127.0.0.1:22",
                        std::net::TcpStream::connect("127.0.0.1:22"),
                    ),
                    attempt(
                        "tcp bind 127.0.0.1:0",
                        std::net::TcpListener::bind("127.0.0.1:0"),
                    ),
                    attempt("udp bind 0.0.0.0:0", std::net::UdpSocket::bind("0.0.0.0:0")),
                    attempt(
                        "resolve localhost",
                        std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80)),
                    ),
                ];
                Ok(Outcome::new(results.join("; ")))
            }
            "env" => {
                let vars = std::env::vars().count();
                let args = std::env::args().count();
                let cwd = std::env::current_dir();
                let home = std::env::var("HOME");
                Ok(Outcome::new(format!(
                    "vars={vars} args={args} cwd={} home={}",
                    cwd.map(|c| c.display().to_string())
                        .unwrap_or_else(|e| format!("refused ({e})")),
                    home.unwrap_or_else(|e| format!("refused ({e})"))
                )))
            }
            "device" => {
                let r = docker::list_containers(arg, &ContainerFilter::all());
                r.map(|l| Outcome::new(format!("listed {} containers on {arg}", l.len())))
            }
            "container" => {
                let (device, name) = arg.split_once('/').unwrap_or(("local", arg));
                docker::restart_container(device, name, Some(1))?;
                Ok(Outcome::new(format!("restarted {name}")))
            }
            "calls" => {
                for _ in 0..u32::MAX {
                    black_box(time::now());
                }
                Ok(Outcome::new("made too many calls"))
            }
            "fields" => {
                let (calls, n) = arg.split_once(':').unwrap_or(("1", arg));
                let fields = vec![(String::new(), String::new()); number(n)];
                for _ in 0..number(calls) {
                    host::log(host::Level::Info, "", &fields);
                }
                Ok(Outcome::new(format!(
                    "logged {calls} records of {n} fields"
                )))
            }
            "records" => {
                for _ in 0..number(arg) {
                    host::log(host::Level::Info, "", &[]);
                }
                Ok(Outcome::new(format!("logged {arg} empty records")))
            }
            "outcome" => Ok(Outcome::new("x".repeat(number(arg) << 20))),
            "denials" => {
                let (n, len) = arg.split_once(':').unwrap_or((arg, "1"));
                let device = "x".repeat(number(len));
                for _ in 0..number(n) {
                    black_box(docker::list_containers(&device, &ContainerFilter::all()).err());
                }
                Ok(Outcome::new(format!("was denied {n} times")))
            }
            "state" => {
                let mut args = arg.split(':').map(number);
                let n = args.next().unwrap_or(0);
                let value = vec![7u8; args.next().unwrap_or(8)];
                let from = args.next().unwrap_or(0);
                for i in 0..n {
                    if let Err(e) = state::set(&format!("key-{:06}", from + i), &value) {
                        return Ok(Outcome::new(format!(
                            "stored {i} of {n}; then: {}",
                            e.message()
                        )));
                    }
                }
                Ok(Outcome::new(format!("stored {n} of {n}")))
            }
            "ok" => Ok(Outcome::new("ok")),
            other => Err(Error::Invalid(format!("unknown mode `{other}`"))),
        }
    }
}

capstan_sdk::export_plugin!(Hostile);
