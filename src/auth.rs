//! Proxy-side authentication and permissions, with Redis 6+ semantics.
//!
//! Users come from `proxy.toml` (`requirepass` for the `default` user, `[[users]]` for named
//! ones). Passwords are kept only as SHA-256 digests and compared in constant time; they are
//! never logged. A user's permissions are command rules (`+@read`, `-@dangerous`, `+get`,
//! `-config|set` …, applied in order like `ACL SETUSER`) and key patterns (read-write `keys`,
//! read-only `read_keys`, Redis glob syntax). A denied command gets Redis's `-NOPERM` text and
//! is never forwarded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::command::{CommandSpec, access, acl};

/// One command rule of a user, applied in order (the last matching rule wins).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Category {
        allow: bool,
        bits: u32,
    },
    /// A command (`get`), a container (`config`: all its subcommands) or a subcommand
    /// (`config|get`).
    Command {
        allow: bool,
        name: String,
    },
}

/// A configured user.
#[derive(Debug)]
pub struct User {
    pub name: String,
    /// SHA-256 digests of the accepted passwords; `None` = no password needed (`nopass`).
    passwords: Option<Vec<[u8; 32]>>,
    pub enabled: bool,
    /// `None` = every command (`+@all` and nothing else).
    rules: Option<Vec<Rule>>,
    /// `None` = every key.
    keys_rw: Option<Vec<Vec<u8>>>,
    keys_r: Vec<Vec<u8>>,
    /// Pub/sub channel patterns; `None` = every channel.
    channels: Option<Vec<Vec<u8>>>,
    /// The command rules as written (`ACL SETUSER` syntax), for the user's shard mirror.
    rule_text: Vec<String>,
}

impl User {
    /// The default user with no password and every permission (no `requirepass`).
    pub fn unrestricted(name: &str) -> Self {
        User {
            name: name.into(),
            passwords: None,
            enabled: true,
            rules: None,
            keys_rw: None,
            keys_r: Vec::new(),
            channels: None,
            rule_text: Vec::new(),
        }
    }

    /// Whether `password` is one of this user's (constant time per digest).
    pub fn password_ok(&self, password: &[u8]) -> bool {
        if !self.enabled {
            return false;
        }
        match &self.passwords {
            None => true,
            Some(list) => {
                let d = sha256(password);
                list.iter().fold(false, |ok, p| ok | ct_eq(p, &d))
            }
        }
    }

    /// Whether this user needs no password (`nopass`).
    pub fn nopass(&self) -> bool {
        self.passwords.is_none()
    }

    /// Whether every command, key and channel is allowed (the hot path skips the checks, and
    /// scripts run with slotgate's own rights on the shard).
    pub fn unrestricted_access(&self) -> bool {
        self.rules.is_none() && self.keys_rw.is_none() && self.channels.is_none()
    }

    /// Whether the user may use pub/sub `channel`: a channel name is matched against the
    /// user's patterns, a `PSUBSCRIBE` pattern (`pattern = true`) must be one of them
    /// literally, as in Redis 7.
    pub fn may_use_channel(&self, channel: &[u8], pattern: bool) -> bool {
        let Some(allowed) = &self.channels else {
            return true;
        };
        allowed.iter().any(|p| {
            if pattern {
                p.as_slice() == channel
            } else {
                glob_match(p, channel)
            }
        })
    }

    /// The rules of this user's mirror on the shards, as `ACL SETUSER` arguments after the
    /// name and password: key patterns, channel patterns, command rules, and no command that
    /// slotgate itself refuses (`deny`). A script of the user runs on a shard connection
    /// authenticated as the mirror, so it can do no more than the user could directly.
    pub fn mirror_rules(&self, deny: &[String]) -> Vec<String> {
        let mut r = Vec::new();
        match &self.keys_rw {
            // Redis takes no pattern after `*`.
            None => r.push("allkeys".to_string()),
            Some(rw) if rw.iter().any(|k| k == b"*") => r.push("allkeys".to_string()),
            Some(rw) => {
                r.push("resetkeys".into());
                r.extend(
                    rw.iter()
                        .map(|k| format!("~{}", String::from_utf8_lossy(k))),
                );
                r.extend(
                    self.keys_r
                        .iter()
                        .map(|k| format!("%R~{}", String::from_utf8_lossy(k))),
                );
            }
        }
        match &self.channels {
            None => r.push("allchannels".into()),
            Some(list) => {
                r.push("resetchannels".into());
                r.extend(
                    list.iter()
                        .map(|c| format!("&{}", String::from_utf8_lossy(c))),
                );
            }
        }
        if self.rules.is_none() {
            r.push("+@all".into());
        } else {
            r.push("-@all".into());
            // slotgate's own commands (SLOTGATE.*) do not exist on the shards.
            r.extend(
                self.rule_text
                    .iter()
                    .filter(|t| !t.to_ascii_lowercase().contains("slotgate."))
                    .cloned(),
            );
        }
        r.extend(deny.iter().map(|c| format!("-{c}")));
        r
    }

    /// Whether the user may run `spec` at all.
    pub fn may_run(&self, spec: &CommandSpec) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        let container = spec.name.split('|').next().unwrap_or(spec.name);
        let mut allowed = false;
        for r in rules {
            match r {
                Rule::Category { allow, bits } => {
                    if spec.acl & bits != 0 || *bits == acl::ALL {
                        allowed = *allow;
                    }
                }
                Rule::Command { allow, name } => {
                    if name == spec.name || name == container {
                        allowed = *allow;
                    }
                }
            }
        }
        allowed
    }

    /// Whether the user may use `key` with the access a key spec needs.
    pub fn may_access(&self, key: &[u8], need: u8) -> bool {
        let Some(rw) = &self.keys_rw else {
            return true;
        };
        let in_rw = rw.iter().any(|p| glob_match(p, key));
        if need & access::WRITE != 0 {
            return in_rw;
        }
        in_rw || self.keys_r.iter().any(|p| glob_match(p, key))
    }
}

/// Permission rules of particular commands, past the command check: SORT's patterns need
/// access to every key, and pub/sub channels are checked against the user's channel patterns
/// (their key specs in SSUBSCRIBE and SPUBLISH are not keys; leaving a channel needs no
/// permission, as in Redis). `Some` when this decides (or refuses) the command; `None` leaves
/// it to the key checks.
pub fn special_permission(
    user: &User,
    name: &str,
    req: &crate::resp::Request<'_>,
) -> Option<Result<(), &'static [u8]>> {
    if matches!(name, "sort" | "sort_ro")
        && !user.may_access(b"*", crate::command::access::READ)
        && let Some(e) = crate::command::policy::sort_acl_error(req)
    {
        return Some(Err(e));
    }
    if matches!(name, "unsubscribe" | "punsubscribe" | "sunsubscribe") {
        return Some(Ok(()));
    }
    let (first, pattern) = crate::command::policy::channel_args(name)?;
    let last = if matches!(name, "publish" | "spublish") {
        2
    } else {
        req.argc()
    };
    Some(
        if (first..last).all(|i| user.may_use_channel(req.arg(i), pattern)) {
            Ok(())
        } else {
            Err(crate::resp::reply::NOPERM_CHANNELS)
        },
    )
}

/// All users; `default` always exists.
pub struct Users {
    by_name: HashMap<String, Arc<User>>,
    /// Token subjects (`token_subjects`) and the user each maps to.
    by_subject: HashMap<String, Arc<User>>,
    /// Token roles (`token_roles`) and their users, in the file's order.
    by_role: Vec<(String, Arc<User>)>,
}

/// A user as written in `proxy.toml`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password (or a list of them).
    #[serde(default)]
    pub password: Option<OneOrMany>,
    /// Hex SHA-256 digest of the password (or a list), so the file holds no secret.
    #[serde(default)]
    pub password_sha256: Option<OneOrMany>,
    /// `true`: no password needed.
    #[serde(default)]
    pub nopass: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Read-write key patterns (Redis glob); absent = no keys.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Read-only key patterns.
    #[serde(default)]
    pub read_keys: Vec<String>,
    /// Command rules in `ACL SETUSER` syntax, applied in order; absent = `+@all`.
    #[serde(default)]
    pub commands: Option<Vec<String>>,
    /// Pub/sub channel patterns (Redis glob, like ACL `&pattern`). Absent: every channel
    /// for a user with no `keys`/`commands` restrictions, none otherwise (Redis 7's
    /// `resetchannels` default).
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// Token authentication: values of a token issuer's username claim (e.g. Entra ID object
    /// ids) that get this user's permissions with a valid token (see `token`).
    #[serde(default)]
    pub token_subjects: Vec<String>,
    /// Token authentication: roles of the token's `roles` claim that get this user's
    /// permissions.
    #[serde(default)]
    pub token_roles: Vec<String>,
}

fn yes() -> bool {
    true
}

/// A string or a list of strings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

impl std::fmt::Debug for Users {
    /// In a stable order: a reload compares two tables by this text.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn sorted(m: &HashMap<String, Arc<User>>) -> Vec<(&String, &Arc<User>)> {
            let mut v: Vec<(&String, &Arc<User>)> = m.iter().collect();
            v.sort_by(|a, b| a.0.cmp(b.0));
            v
        }
        let by_subject: Vec<(&String, &String)> = sorted(&self.by_subject)
            .into_iter()
            .map(|(s, u)| (s, &u.name))
            .collect();
        let by_role: Vec<(&String, &String)> =
            self.by_role.iter().map(|(r, u)| (r, &u.name)).collect();
        f.debug_struct("Users")
            .field("by_name", &sorted(&self.by_name))
            .field("by_subject", &by_subject)
            .field("by_role", &by_role)
            .finish()
    }
}

impl Users {
    /// Builds the user table. `requirepass` is the default user's password unless a
    /// `[[users]]` entry named `default` is given (both at once is an error).
    pub fn build(requirepass: Option<&str>, users: &[UserConfig]) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        let mut by_subject = HashMap::new();
        let mut by_role = Vec::new();
        for u in users {
            if u.name.is_empty() || u.name.contains(char::is_whitespace) {
                return Err(format!("invalid user name '{}'", u.name));
            }
            if by_name.contains_key(&u.name) {
                return Err(format!("user '{}' is defined twice", u.name));
            }
            if u.name == "default" && requirepass.is_some() {
                return Err("give requirepass or a [[users]] entry named default, not both".into());
            }
            let user = Arc::new(compile(u)?);
            for s in &u.token_subjects {
                if s.is_empty() {
                    return Err(format!("user '{}': an empty token subject", u.name));
                }
                if let Some(other) = by_subject.insert(s.clone(), user.clone()) {
                    return Err(format!(
                        "token subject '{s}' is given to both user '{}' and user '{}'",
                        other.name, u.name
                    ));
                }
            }
            for r in &u.token_roles {
                if r.is_empty() {
                    return Err(format!("user '{}': an empty token role", u.name));
                }
                by_role.push((r.clone(), user.clone()));
            }
            by_name.insert(u.name.clone(), user);
        }
        if !by_name.contains_key("default") {
            let mut d = User::unrestricted("default");
            if let Some(p) = requirepass {
                d.passwords = Some(vec![sha256(p.as_bytes())]);
            }
            by_name.insert("default".into(), Arc::new(d));
        }
        Ok(Users {
            by_name,
            by_subject,
            by_role,
        })
    }

    /// No authentication and no restrictions at all.
    pub fn open() -> Self {
        Users::build(None, &[]).expect("the open user table is valid")
    }

    pub fn default_user(&self) -> &Arc<User> {
        &self.by_name["default"]
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<User>> {
        std::str::from_utf8(name)
            .ok()
            .and_then(|n| self.by_name.get(n))
    }

    /// Whether new connections start unauthenticated (the default user needs a password or
    /// is disabled), as with Redis's `requirepass`.
    pub fn auth_required(&self) -> bool {
        let d = self.default_user();
        !(d.enabled && d.nopass())
    }

    /// `AUTH [user] password`: the user, when the credentials are right.
    pub fn authenticate(&self, user: &[u8], password: &[u8]) -> Option<Arc<User>> {
        let u = self.get(user)?;
        u.password_ok(password).then(|| u.clone())
    }

    /// The user a valid token maps to: the one listing its subject in `token_subjects`,
    /// else the first (in the file's order) sharing one of its `roles` in `token_roles`.
    /// A disabled user maps no token: the next rule applies (a disabled personal grant
    /// leaves the role's).
    pub fn for_token(&self, subject: &str, roles: &[&str]) -> Option<Arc<User>> {
        self.by_subject
            .get(subject)
            .filter(|u| u.enabled)
            .or_else(|| {
                self.by_role
                    .iter()
                    .find(|(r, u)| u.enabled && roles.contains(&r.as_str()))
                    .map(|(_, u)| u)
            })
            .cloned()
    }

    /// Whether some user can be reached with a token.
    pub fn token_users(&self) -> bool {
        !self.by_subject.is_empty() || !self.by_role.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn compile(u: &UserConfig) -> Result<User, String> {
    let mut digests = Vec::new();
    for p in u
        .password
        .clone()
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
    {
        digests.push(sha256(p.as_bytes()));
    }
    for h in u
        .password_sha256
        .clone()
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
    {
        digests.push(parse_hex32(&h).ok_or_else(|| {
            format!(
                "user '{}': password_sha256 must be 64 hex digits (the SHA-256 of the password)",
                u.name
            )
        })?);
    }
    let by_token = !u.token_subjects.is_empty() || !u.token_roles.is_empty();
    let passwords = match (u.nopass, digests.is_empty()) {
        (true, true) => None,
        // Reached only with a token: no password opens it.
        (false, true) if by_token => Some(Vec::new()),
        (true, false) => {
            return Err(format!(
                "user '{}': nopass together with a password",
                u.name
            ));
        }
        (false, true) => {
            return Err(format!(
                "user '{}': give password, password_sha256, token_subjects, token_roles \
                 or nopass = true",
                u.name
            ));
        }
        (false, false) => Some(digests),
    };
    let rules = match &u.commands {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|r| parse_rule(r).map_err(|e| format!("user '{}': {e}", u.name)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let keys_rw = if u.keys.iter().any(|k| k == "*") && u.read_keys.is_empty() {
        None
    } else {
        Some(u.keys.iter().map(|k| k.as_bytes().to_vec()).collect())
    };
    let channels = match &u.channels {
        Some(list) if list.iter().any(|c| c == "*") => None,
        Some(list) => Some(list.iter().map(|c| c.as_bytes().to_vec()).collect()),
        None if rules.is_none() && keys_rw.is_none() => None,
        None => Some(Vec::new()),
    };
    Ok(User {
        name: u.name.clone(),
        passwords,
        enabled: u.enabled,
        rules,
        keys_rw,
        keys_r: u.read_keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        channels,
        rule_text: u
            .commands
            .iter()
            .flatten()
            .map(|r| r.trim().to_string())
            .collect(),
    })
}

/// `+@read`, `-@dangerous`, `+get`, `-config|set`, `allcommands`, `nocommands`.
fn parse_rule(r: &str) -> Result<Rule, String> {
    let r = r.trim();
    match r.to_ascii_lowercase().as_str() {
        "allcommands" => {
            return Ok(Rule::Category {
                allow: true,
                bits: acl::ALL,
            });
        }
        "nocommands" => {
            return Ok(Rule::Category {
                allow: false,
                bits: acl::ALL,
            });
        }
        _ => {}
    }
    let (allow, rest) = match r.as_bytes().first() {
        Some(b'+') => (true, &r[1..]),
        Some(b'-') => (false, &r[1..]),
        _ => return Err(format!("command rule '{r}' must start with + or -")),
    };
    let rest = rest.to_ascii_lowercase();
    if let Some(cat) = rest.strip_prefix('@') {
        let bits = acl::NAMES
            .iter()
            .find(|(n, _)| *n == cat)
            .map(|(_, b)| *b)
            .ok_or_else(|| format!("unknown command category '@{cat}'"))?;
        return Ok(Rule::Category { allow, bits });
    }
    let (container, sub) = match rest.split_once('|') {
        Some((c, s)) => (c, Some(s)),
        None => (rest.as_str(), None),
    };
    let spec = crate::command::lookup(container.as_bytes())
        .ok_or_else(|| format!("unknown command '{container}' in rule '{r}'"))?;
    if let Some(s) = sub {
        crate::command::lookup_sub(spec, s.as_bytes())
            .ok_or_else(|| format!("unknown subcommand '{rest}' in rule '{r}'"))?;
    }
    Ok(Rule::Command { allow, name: rest })
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn parse_hex32(h: &str) -> Option<[u8; 32]> {
    let h = h.trim();
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether two secrets are equal, in a time that does not depend on where they differ
/// (their SHA-256 digests are compared).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    ct_eq(&sha256(a), &sha256(b))
}

/// Redis's `stringmatchlen`: `*`, `?`, `[abc]`, `[^a-z]`, `\x` escapes. Iterative, with
/// backtracking only to the last `*` (linear in practice, no recursion on untrusted input).
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    while p < pat.len() && pat[p] == b'*' {
                        p += 1;
                    }
                    if p == pat.len() {
                        return true;
                    }
                    star = Some((p, i));
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(pat, p, s[i])
                        && matched
                    {
                        p = next;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pat.len() => {
                    if pat[p + 1] == s[i] {
                        p += 2;
                        i += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[i] {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, si)) => {
                p = sp;
                i = si + 1;
                star = Some((sp, si + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `pat[p] == '['`: (matched, index after `]`).
fn class(pat: &[u8], p: usize, c: u8) -> Option<(bool, usize)> {
    let mut j = p + 1;
    let negate = pat.get(j) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut matched = false;
    loop {
        let x = *pat.get(j)?;
        if x == b']' {
            break;
        }
        if x == b'\\' && j + 1 < pat.len() {
            matched |= pat[j + 1] == c;
            j += 2;
        } else if pat.get(j + 1) == Some(&b'-') && j + 2 < pat.len() && pat[j + 2] != b']' {
            let (lo, hi) = (x.min(pat[j + 2]), x.max(pat[j + 2]));
            matched |= (lo..=hi).contains(&c);
            j += 3;
        } else {
            matched |= x == c;
            j += 1;
        }
    }
    Some((matched != negate, j + 1))
}

/// Failed AUTHs per source address, across connections (Redis counts none): past `budget`
/// failures within a minute, the address waits before its next AUTH is even checked — 1 s,
/// doubling with each further failure, up to a minute — and a quiet minute forgets it. Also
/// keeps the "AUTH failed" warnings to one line a second, with a count of those left out.
pub struct AuthGuard {
    by_addr: Mutex<AddressTable>,
    /// The second (since `epoch`) of the last warning, and warnings left out since.
    warned_at: AtomicU64,
    unwarned: AtomicU64,
    epoch: Instant,
}

/// The failures per address, and the addresses in the order they came (the oldest is
/// forgotten first when the table is full).
#[derive(Default)]
struct AddressTable {
    map: HashMap<IpAddr, Failures>,
    order: std::collections::VecDeque<IpAddr>,
}

/// The address failures are counted for: an IPv6 client is counted per /64 (one host can
/// have a whole /64 to itself), an IPv4-mapped one as its IPv4 address.
fn counted_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

struct Failures {
    since: Instant,
    count: u32,
    backoff: Duration,
    blocked_until: Option<Instant>,
}

/// How long failures are counted, and the longest wait.
const AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most (their failures are forgotten beyond, oldest first).
const AUTH_ADDRESSES: usize = 100_000;

impl Default for AuthGuard {
    fn default() -> Self {
        AuthGuard {
            by_addr: Mutex::new(AddressTable::default()),
            warned_at: AtomicU64::new(u64::MAX),
            unwarned: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl AuthGuard {
    /// `Err(wait)` while `ip` must wait before an AUTH of it is checked.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let table = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        match table
            .map
            .get(&counted_address(ip))
            .and_then(|f| f.blocked_until)
        {
            Some(until) if now < until => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Counts a failed AUTH of `ip`; `Some(wait)` when that put it over `budget` (0: no
    /// budget).
    pub fn failed(&self, ip: IpAddr, now: Instant, budget: u32) -> Option<Duration> {
        if budget == 0 {
            return None;
        }
        let ip = counted_address(ip);
        let mut table = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let AddressTable { map, order } = &mut *table;
        if !map.contains_key(&ip) {
            // Full: the oldest address goes (an attacker needs as many addresses to push a
            // blocked one out as the table holds).
            while map.len() >= AUTH_ADDRESSES {
                match order.pop_front() {
                    Some(old) => {
                        map.remove(&old);
                    }
                    None => break,
                }
            }
            order.push_back(ip);
        }
        let f = map.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
            backoff: Duration::ZERO,
            blocked_until: None,
        });
        // A minute without failures (after the last wait, if any) forgets the address.
        let quiet_from = f.blocked_until.unwrap_or(f.since);
        if now >= quiet_from + AUTH_WINDOW {
            *f = Failures {
                since: now,
                count: 0,
                backoff: Duration::ZERO,
                blocked_until: None,
            };
        }
        f.count += 1;
        if f.count <= budget {
            return None;
        }
        f.backoff = (f.backoff * 2).clamp(Duration::from_secs(1), AUTH_WINDOW);
        f.blocked_until = Some(now + f.backoff);
        Some(f.backoff)
    }

    /// Whether a warning may be logged now (at most one a second): `Some(n)` with the
    /// number of warnings left out since the last one.
    pub fn may_warn(&self, now: Instant) -> Option<u64> {
        let second = now.duration_since(self.epoch).as_secs();
        let last = self.warned_at.load(Ordering::Relaxed);
        if last == second
            || self
                .warned_at
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unwarned.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.unwarned.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_budget_make_an_address_wait_longer_each_time() {
        let g = AuthGuard::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(g.failed(a, t0, 3), None, "failure {i} is within the budget");
        }
        assert_eq!(g.failed(a, t0, 3), Some(Duration::from_secs(1)));
        assert_eq!(g.check(a, t0), Err(Duration::from_secs(1)));
        assert_eq!(g.check(b, t0), Ok(()), "other addresses are not affected");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(g.check(a, t1), Ok(()));
        assert_eq!(g.failed(a, t1, 3), Some(Duration::from_secs(2)));
        assert_eq!(
            g.failed(a, t1 + Duration::from_secs(2), 3),
            Some(Duration::from_secs(4))
        );
        // Doubling stops at a minute.
        let mut t = t1 + Duration::from_secs(6);
        let mut waits = Vec::new();
        for _ in 0..6 {
            let w = g.failed(a, t, 3).expect("still over the budget");
            waits.push(w.as_secs());
            t += w;
        }
        assert_eq!(waits, [8, 16, 32, 60, 60, 60]);
        // A quiet minute after the wait forgets the address.
        let later = t + AUTH_WINDOW + AUTH_WINDOW;
        assert_eq!(g.failed(a, later, 3), None);
        // No budget: never throttled.
        for _ in 0..100 {
            assert_eq!(g.failed(b, t0, 0), None);
        }
        assert_eq!(g.check(b, t0), Ok(()));
    }

    #[test]
    fn a_full_table_forgets_the_oldest_and_ipv6_counts_per_64() {
        let g = AuthGuard::default();
        let t = Instant::now();
        // Fill the table with one failure from each of as many addresses as it holds.
        for i in 0..AUTH_ADDRESSES as u32 {
            g.failed(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t, 3);
        }
        // A new address is still counted and throttled (adversarial review: it was not).
        let fresh: IpAddr = "192.168.1.1".parse().unwrap();
        let over = (0..5).filter_map(|_| g.failed(fresh, t, 3)).count();
        assert_eq!(over, 2, "the 4th and 5th failures are over the budget");
        assert!(g.check(fresh, t).is_err());
        assert!(g.by_addr.lock().unwrap().map.len() <= AUTH_ADDRESSES);
        // Two addresses of one /64 are one.
        let (a, b): (IpAddr, IpAddr) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::ffff:2".parse().unwrap(),
        );
        for _ in 0..3 {
            assert_eq!(g.failed(a, t, 3), None);
        }
        assert!(g.failed(b, t, 3).is_some(), "the same /64");
    }

    #[test]
    fn warnings_are_one_a_second_with_a_count_of_the_rest() {
        let g = AuthGuard::default();
        let t = g.epoch + Duration::from_millis(10);
        assert_eq!(g.may_warn(t), Some(0));
        for _ in 0..2009 {
            assert_eq!(g.may_warn(t + Duration::from_millis(500)), None);
        }
        assert_eq!(g.may_warn(t + Duration::from_secs(1)), Some(2009));
        assert_eq!(g.may_warn(t + Duration::from_secs(2)), Some(0));
    }

    #[test]
    fn globs_like_redis() {
        assert!(glob_match(b"tenantA:*", b"tenantA:x"));
        assert!(!glob_match(b"tenantA:*", b"tenantB:x"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"h?llo", b"hello"));
        assert!(glob_match(b"h[ae]llo", b"hallo"));
        assert!(!glob_match(b"h[^e]llo", b"hello"));
        assert!(glob_match(b"h[a-b]llo", b"hbllo"));
        assert!(glob_match(b"a\\*b", b"a*b"));
        assert!(!glob_match(b"a\\*b", b"axb"));
        assert!(glob_match(b"*a*b*c", b"xxaxxbxxc"));
        assert!(!glob_match(b"*a*b*c", b"xxaxxbxx"));
    }

    fn user(keys: &[&str], read: &[&str], commands: Option<&[&str]>) -> User {
        compile(&UserConfig {
            name: "u".into(),
            password: Some(OneOrMany::One("pw".into())),
            password_sha256: None,
            nopass: false,
            enabled: true,
            keys: keys.iter().map(|s| s.to_string()).collect(),
            read_keys: read.iter().map(|s| s.to_string()).collect(),
            commands: commands.map(|c| c.iter().map(|s| s.to_string()).collect()),
            channels: None,
            token_subjects: vec![],
            token_roles: vec![],
        })
        .unwrap()
    }

    #[test]
    fn command_rules_apply_in_order() {
        let u = user(&["*"], &[], Some(&["+@read", "+set", "-@dangerous"]));
        let get = crate::command::lookup(b"get").unwrap();
        let set = crate::command::lookup(b"set").unwrap();
        let del = crate::command::lookup(b"del").unwrap();
        let keys = crate::command::lookup(b"keys").unwrap();
        assert!(u.may_run(get) && u.may_run(set));
        assert!(!u.may_run(del), "del is @write, not allowed");
        assert!(!u.may_run(keys), "keys is @read but @dangerous comes later");
        let config = crate::command::lookup(b"config").unwrap();
        let cget = crate::command::lookup_sub(config, b"get").unwrap();
        let u2 = user(&["*"], &[], Some(&["+config|get"]));
        assert!(u2.may_run(cget));
        assert!(!u2.may_run(crate::command::lookup_sub(config, b"set").unwrap()));
    }

    #[test]
    fn channels_default_to_none_for_restricted_users_and_mirror_rules_follow_the_user() {
        let open = user(&["*"], &[], None);
        assert!(open.unrestricted_access() && open.may_use_channel(b"any", false));
        let tenant = user(&["t:*"], &["r:*"], Some(&["+@all", "-@dangerous"]));
        assert!(
            !tenant.may_use_channel(b"news", false),
            "resetchannels by default"
        );
        let cfg_user = |channels: &[&str]| {
            compile(&UserConfig {
                name: "c".into(),
                password: None,
                password_sha256: None,
                nopass: true,
                enabled: true,
                keys: vec!["t:*".into()],
                read_keys: vec![],
                commands: None,
                channels: Some(channels.iter().map(|s| s.to_string()).collect()),
                token_subjects: vec![],
                token_roles: vec![],
            })
            .unwrap()
        };
        let c = cfg_user(&["news.*"]);
        assert!(c.may_use_channel(b"news.eu", false));
        assert!(!c.may_use_channel(b"sport", false));
        assert!(
            c.may_use_channel(b"news.*", true),
            "a pattern must match literally"
        );
        assert!(!c.may_use_channel(b"news.e*", true));
        assert!(cfg_user(&["*"]).may_use_channel(b"x", true));
        assert_eq!(
            tenant.mirror_rules(&["move".into()]),
            [
                "resetkeys",
                "~t:*",
                "%R~r:*",
                "resetchannels",
                "-@all",
                "+@all",
                "-@dangerous",
                "-move"
            ]
        );
        assert_eq!(open.mirror_rules(&[]), ["allkeys", "allchannels", "+@all"]);
    }

    #[test]
    fn key_patterns_with_read_only() {
        let u = user(&["t:*"], &["r:*"], None);
        assert!(u.may_access(b"t:1", access::WRITE | access::READ));
        assert!(u.may_access(b"r:1", access::READ));
        assert!(!u.may_access(b"r:1", access::WRITE));
        assert!(!u.may_access(b"x", access::READ));
        assert!(u.may_access(b"r:1", 0), "no flags: any pattern suffices");
    }

    #[test]
    fn tokens_map_by_subject_then_role_skipping_disabled_users() {
        let cfg = |name: &str, subjects: &[&str], roles: &[&str], enabled: bool| UserConfig {
            name: name.into(),
            password: None,
            password_sha256: None,
            nopass: false,
            enabled,
            keys: vec!["*".into()],
            read_keys: vec![],
            commands: None,
            channels: None,
            token_subjects: subjects.iter().map(|s| s.to_string()).collect(),
            token_roles: roles.iter().map(|s| s.to_string()).collect(),
        };
        let build = || {
            Users::build(
                None,
                &[
                    cfg("alice-admin", &["oid-alice"], &[], false),
                    cfg("old-readers", &[], &["Reader"], false),
                    cfg("readers", &[], &["Reader", "Viewer"], true),
                    cfg("writers", &["oid-bob"], &["Writer"], true),
                ],
            )
            .unwrap()
        };
        let users = build();
        let name = |s: &str, r: &[&str]| users.for_token(s, r).map(|u| u.name.clone());
        assert_eq!(name("oid-bob", &["Reader"]).as_deref(), Some("writers"));
        assert_eq!(
            name("oid-x", &["Viewer", "Writer"]).as_deref(),
            Some("readers")
        );
        assert_eq!(
            name("oid-alice", &["Reader"]).as_deref(),
            Some("readers"),
            "a disabled personal grant leaves the role's, and a disabled role user is skipped"
        );
        assert_eq!(name("oid-alice", &[]), None);
        // Token-only users: no password opens them.
        assert!(users.authenticate(b"readers", b"").is_none());
        assert!(users.token_users());
        // The same file twice prints the same (a reload compares the text).
        for _ in 0..20 {
            assert_eq!(format!("{users:?}"), format!("{:?}", build()));
        }
        let dup = Users::build(
            None,
            &[cfg("a", &["s"], &[], true), cfg("b", &["s"], &[], true)],
        );
        assert!(dup.unwrap_err().contains("token subject 's'"));
    }

    #[test]
    fn passwords_plain_and_hashed() {
        let hashed = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"; // "password"
        let users = Users::build(
            Some("top"),
            &[UserConfig {
                name: "app".into(),
                password: None,
                password_sha256: Some(OneOrMany::One(hashed.into())),
                nopass: false,
                enabled: true,
                keys: vec!["*".into()],
                read_keys: vec![],
                commands: None,
                channels: None,
                token_subjects: vec![],
                token_roles: vec![],
            }],
        )
        .unwrap();
        assert!(users.auth_required());
        assert!(users.authenticate(b"app", b"password").is_some());
        assert!(users.authenticate(b"app", b"Password").is_none());
        assert!(users.authenticate(b"default", b"top").is_some());
        assert!(users.authenticate(b"nobody", b"top").is_none());
        assert!(!Users::open().auth_required());
    }

    #[test]
    fn bad_rules_are_rejected() {
        assert!(parse_rule("+@nosuch").is_err());
        assert!(parse_rule("get").is_err());
        assert!(parse_rule("+nosuchcmd").is_err());
        assert!(parse_rule("+config|nosuch").is_err());
        assert_eq!(
            parse_rule("-@dangerous").unwrap(),
            Rule::Category {
                allow: false,
                bits: acl::DANGEROUS
            }
        );
    }
}
