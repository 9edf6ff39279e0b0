//! Token authentication (`[[token_issuers]]`): JWT access tokens on AUTH and HELLO AUTH,
//! mapped to users by subject or role; every way a token can be wrong; expiry on live
//! connections; JWKS rotation; `--check-config`. Keys and tokens are made here
//! (`support::jwt`), against real redis-servers behind a real slotgate.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use support::jwt::{self, SigningKey, claims, now};
use support::*;

const ISS: &str = "https://login.example.test/tenant/v2.0";
const AUD: &str = "api://slotgate";
const OK: &[u8] = b"+OK\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const NOPERM_KEYS: &[u8] =
    b"-NOPERM this user has no permissions to access one of the keys used as arguments\r\n";

/// `proxy.toml` with one issuer reading `jwks`, and users reached by subject and by role.
fn write_config(dir: &Path, jwks: &Path, leeway: &str) -> PathBuf {
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"requirepass = "pw"

[[token_issuers]]
name = "corp"
issuer = "{ISS}"
audience = ["api://other", "{AUD}"]
jwks_file = "{}"
username_claim = "oid"
leeway = "{leeway}"

[[users]]
name = "app-writer"
token_subjects = ["oid-writer"]
keys = ["*"]

[[users]]
name = "cache-reader"
token_roles = ["CacheReader"]
keys = ["app:*"]
commands = ["+@read", "+@connection"]
"#,
            jwks.display()
        ),
    )
    .unwrap();
    cfg
}

fn auth(c: &mut RawConn, user: &str, token: &str) -> Vec<u8> {
    c.call(&[b"AUTH", user.as_bytes(), token.as_bytes()])
}

/// slotgate with `cfg`, for tests that poll with AUTHs: those fail many times from one
/// address, so the per-address limit is off.
fn polled_proxy(shard: &RedisServer, cfg: &Path) -> Slotgate {
    Slotgate::start_with(
        &[shard],
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--max-auth-failures-per-address",
            "0",
        ],
    )
}

/// The value of an `INFO stats` field.
fn info_stat(c: &mut RawConn, field: &str) -> u64 {
    let info = String::from_utf8(c.call(&[b"INFO", b"stats"])).unwrap();
    info_u64(&info, field)
}

/// A labelled sample of `/metrics`.
fn metric(admin: u16, sample: &str) -> f64 {
    http_get(admin, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn valid_tokens_map_to_their_users_and_every_bad_token_is_refused() {
    let shard = RedisServer::start();
    let dir = support::tls::temp_dir("tokens");
    let (rsa, ec) = (SigningKey::rsa("rsa-1"), SigningKey::ec("ec-1"));
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwt::jwks(&[&rsa, &ec])).unwrap();
    let cfg = write_config(&dir, &jwks_path, "1s");
    let admin = free_port();
    let log = dir.join("slotgate.log");
    let proxy = Slotgate::start_logged(
        &[&shard],
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--max-auth-failures-per-address",
            "0",
        ],
        Some(&log),
    );
    let exp = now() + 3600;

    // RS256, mapped by subject: every key.
    let writer = rsa.token(&claims(ISS, AUD, "oid-writer", exp));
    let mut w = proxy.raw();
    assert_eq!(auth(&mut w, "oid-writer", &writer), OK);
    assert_eq!(w.call(&[b"SET", b"other:1", b"v"]), OK);
    let list = String::from_utf8(w.call(&[b"CLIENT", b"LIST"])).unwrap();
    let me = list.lines().find(|l| l.contains("cmd=client")).unwrap();
    assert!(me.contains(" user=app-writer "), "{me}");
    assert!(me.ends_with(&format!(" token-exp={exp}")), "{me}");

    // ES256, mapped by role: the reader's key pattern and commands, on HELLO AUTH too.
    let mut reader_claims = claims(ISS, AUD, "oid-someone", exp);
    reader_claims["roles"] = json!(["Other", "CacheReader"]);
    let reader = ec.token(&reader_claims);
    let mut r = proxy.raw();
    let hello = r.call(&[b"HELLO", b"3", b"AUTH", b"oid-someone", reader.as_bytes()]);
    assert!(
        hello.starts_with(b"%"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    assert_eq!(r.call(&[b"GET", b"app:1"]), b"_\r\n");
    assert_eq!(r.call(&[b"GET", b"other:1"]), NOPERM_KEYS);
    let set = r.call(&[b"SET", b"app:1", b"v"]);
    assert!(
        set.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&set)
    );

    // An `exp` too far for a clock is a token that never expires (review: it panicked).
    let far = 1u64 << 63;
    let mut f = proxy.raw();
    let far_token = rsa.token(&claims(ISS, AUD, "oid-writer", far));
    assert_eq!(auth(&mut f, "oid-writer", &far_token), OK);
    assert_eq!(f.call(&[b"PING"]), b"+PONG\r\n");
    let list = String::from_utf8(f.call(&[b"CLIENT", b"LIST"])).unwrap();
    assert!(list.contains(&format!(" token-exp={far}\n")), "{list}");

    // Password users keep working beside the tokens.
    let mut p = proxy.raw();
    assert_eq!(p.call(&[b"AUTH", b"pw"]), OK);

    // Every wrong token: WRONGPASS, counted by reason, the connection unauthenticated.
    let other = SigningKey::rsa("rsa-unknown");
    let mut tampered = claims(ISS, AUD, "oid-writer", exp);
    let good_sig = writer.rsplit('.').next().unwrap().to_string();
    tampered["oid"] = json!("oid-admin");
    let header = jwt::b64(
        json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"})
            .to_string()
            .as_bytes(),
    );
    let tampered = format!(
        "{header}.{}.{good_sig}",
        jwt::b64(tampered.to_string().as_bytes())
    );
    let none = format!(
        "{}.{}.",
        jwt::b64(
            json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})
                .to_string()
                .as_bytes()
        ),
        jwt::b64(claims(ISS, AUD, "oid-writer", exp).to_string().as_bytes())
    );
    let hs_header = json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"});
    let crit_header = json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1", "crit": ["exp"]});
    let mut bad_nbf = claims(ISS, AUD, "oid-writer", exp);
    bad_nbf["nbf"] = json!("soon");
    let mut not_yet = claims(ISS, AUD, "oid-writer", exp);
    not_yet["nbf"] = json!(now() + 600);
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "expired",
            rsa.token(&claims(ISS, AUD, "oid-writer", now() - 30)),
            "oid-writer",
            "expired",
        ),
        (
            "not yet valid",
            rsa.token(&not_yet),
            "oid-writer",
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            rsa.token(&claims("https://evil.test/", AUD, "oid-writer", exp)),
            "oid-writer",
            "issuer",
        ),
        (
            "wrong audience",
            rsa.token(&claims(ISS, "api://elsewhere", "oid-writer", exp)),
            "oid-writer",
            "audience",
        ),
        ("wrong username", writer.clone(), "oid-admin", "username"),
        (
            "unknown kid",
            other.token(&claims(ISS, AUD, "oid-writer", exp)),
            "oid-writer",
            "unknown_key",
        ),
        ("tampered", tampered, "oid-admin", "signature"),
        ("alg none", none, "oid-writer", "algorithm"),
        (
            "HS256 with the RSA key id",
            rsa.token_with_header(&hs_header, &claims(ISS, AUD, "oid-writer", exp)),
            "oid-writer",
            "algorithm",
        ),
        (
            "no user for it",
            rsa.token(&claims(ISS, AUD, "oid-nobody", exp)),
            "oid-nobody",
            "no_user",
        ),
        (
            "a crit header",
            rsa.token_with_header(&crit_header, &claims(ISS, AUD, "oid-writer", exp)),
            "oid-writer",
            "malformed",
        ),
        (
            "nbf not a number",
            rsa.token(&bad_nbf),
            "oid-writer",
            "malformed",
        ),
    ];
    for (what, token, user, _) in &cases {
        let mut c = proxy.raw();
        assert_eq!(auth(&mut c, user, token), WRONGPASS, "{what}");
        assert_eq!(
            c.call(&[b"GET", b"app:1"]),
            b"-NOAUTH Authentication required.\r\n",
            "{what}: still unauthenticated"
        );
    }
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"AUTH", b"pw"]), OK);
    assert_eq!(info_stat(&mut c, "token_auths"), 3);
    assert_eq!(info_stat(&mut c, "token_auth_failures"), cases.len() as u64);
    wait_until("the per-reason metrics", Duration::from_secs(5), || {
        cases.iter().all(|(_, _, _, reason)| {
            let want = cases.iter().filter(|c| c.3 == *reason).count() as f64;
            metric(
                admin,
                &format!("slotgate_token_auth_failures_total{{reason=\"{reason}\"}}"),
            ) == want
        })
    });
    // The log says why, never the token.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("token refused: expired"), "{text}");
    for (_, token, _, _) in &cases {
        let signature = token.rsplit('.').next().unwrap();
        assert!(signature.is_empty() || !text.contains(signature), "{text}");
    }
    assert!(!text.contains(&writer), "{text}");
}

#[test]
fn an_expiring_token_closes_the_connection_after_its_pending_replies_unless_it_re_auths() {
    let shard = RedisServer::start();
    let dir = support::tls::temp_dir("token-expiry");
    let rsa = SigningKey::rsa("k1");
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwt::jwks(&[&rsa])).unwrap();
    let cfg = write_config(&dir, &jwks_path, "0");
    // A script that keeps the shard busy past the expiry must not time out first.
    let proxy = Slotgate::start_with(
        &[&shard],
        &["--config", cfg.to_str().unwrap(), "--op-timeout", "10s"],
    );
    let soon = now() + 2;
    let short = rsa.token(&claims(ISS, AUD, "oid-writer", soon));

    // A: its token expires while a slow script runs; the script's reply and the PING sent
    // behind it arrive, then the connection closes.
    let mut a = proxy.raw();
    a.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(auth(&mut a, "oid-writer", &short), OK);
    // B: re-AUTHs with a later token before the first expires: it stays.
    let mut b = proxy.raw();
    assert_eq!(auth(&mut b, "oid-writer", &short), OK);
    let later_exp = now() + 3600;
    let later = rsa.token(&claims(ISS, AUD, "oid-writer", later_exp));
    assert_eq!(auth(&mut b, "oid-writer", &later), OK);
    // C: re-AUTHs with a password: no token, no expiry.
    let mut c = proxy.raw();
    assert_eq!(auth(&mut c, "oid-writer", &short), OK);
    assert_eq!(c.call(&[b"AUTH", b"pw"]), OK);
    // D: blocked in BLPOP when its token expires: closed at once (it might never return).
    let mut d = proxy.raw();
    assert_eq!(auth(&mut d, "oid-writer", &short), OK);
    d.send(&resp(&[b"BLPOP", b"nothing-comes", b"0"]));
    // E: RESET drops the token: it stays, unauthenticated (review: it was closed).
    let mut e = proxy.raw();
    assert_eq!(auth(&mut e, "oid-writer", &short), OK);
    assert_eq!(e.call(&[b"RESET"]), b"+RESET\r\n");
    // F: a reload does not forget its expiry (review: it did, and F stayed for good).
    let mut f = proxy.raw();
    assert_eq!(auth(&mut f, "oid-writer", &short), OK);
    assert_eq!(c.call(&[b"SLOTGATE.RELOAD"]), OK);

    let busy = "local function us() local t = redis.call('TIME') return t[1] * 1000000 + t[2] end \
                local s = us() while us() - s < 3000000 do end return 'done'";
    let mut pipeline = resp(&[b"EVAL", busy.as_bytes(), b"0"]);
    pipeline.extend(resp(&[b"PING"]));
    a.send(&pipeline);
    let replies = a.read_replies(2);
    assert_eq!(replies, [b"$4\r\ndone\r\n".to_vec(), b"+PONG\r\n".to_vec()]);
    assert!(now() > soon, "the script outlived the token");
    assert!(a.is_closed(), "closed after its pending replies");
    assert!(d.is_closed(), "the blocked client was closed");
    assert!(f.is_closed(), "closed at the expiry despite the reload");

    wait_until("the short token to be past", Duration::from_secs(5), || {
        now() > soon
    });
    assert_eq!(b.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(c.call(&[b"PING"]), b"+PONG\r\n");
    assert_eq!(e.call(&[b"PING"]), b"-NOAUTH Authentication required.\r\n");
    // A and D leave the client list (A once its lingering read ends); B shows its new expiry.
    let mut list = String::new();
    wait_until("only B to have a token", Duration::from_secs(10), || {
        list = String::from_utf8(b.call(&[b"CLIENT", b"LIST"])).unwrap();
        list.lines().filter(|l| l.contains("token-exp=")).count() == 1
    });
    assert!(
        list.contains(&format!(" token-exp={later_exp}\n")),
        "{list}"
    );
    assert_eq!(list.matches("id=").count(), 3, "B, C and E: {list}");
}

#[test]
fn jwks_rotation_by_sighup_and_an_unknown_kid_reads_the_keys_again() {
    let shard = RedisServer::start();
    let dir = support::tls::temp_dir("token-rotation");
    let (k1, k2, k3) = (
        SigningKey::ec("k1"),
        SigningKey::ec("k2"),
        SigningKey::ec("k3"),
    );
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwt::jwks(&[&k1])).unwrap();
    let cfg = write_config(&dir, &jwks_path, "1s");
    let proxy = polled_proxy(&shard, &cfg);
    let by = |k: &SigningKey| k.token(&claims(ISS, AUD, "oid-writer", now() + 3600));
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k1)), OK);
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k2)), WRONGPASS);

    // A key added to the file is found by the first token that names it.
    std::fs::write(&jwks_path, jwt::jwks(&[&k1, &k2])).unwrap();
    wait_until("k2 to be accepted", Duration::from_secs(5), || {
        auth(&mut proxy.raw(), "oid-writer", &by(&k2)) == OK
    });

    // A key removed from the file stays trusted until a reload.
    std::fs::write(&jwks_path, jwt::jwks(&[&k3])).unwrap();
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k1)), OK);
    proxy.signal("HUP");
    wait_until(
        "k1 to be refused after SIGHUP",
        Duration::from_secs(5),
        || auth(&mut proxy.raw(), "oid-writer", &by(&k1)) == WRONGPASS,
    );
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k2)), WRONGPASS);
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k3)), OK);

    // A broken file on reload: the running keys stay.
    std::fs::write(&jwks_path, "{ not json").unwrap();
    proxy.signal("HUP");
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"AUTH", b"pw"]), OK);
    assert_eq!(c.call(&[b"SLOTGATE.RELOAD"])[0], b'-');
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k3)), OK);
}

#[test]
fn check_config_reads_the_jwks_and_rejects_bad_issuers() {
    let dir = support::tls::temp_dir("token-check");
    let key = SigningKey::ec("k1");
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwt::jwks(&[&key])).unwrap();
    let check =
        |cfg: &Path| check_config(&["--config", cfg.to_str().unwrap(), "--shard", "127.0.0.1:1"]);
    let cfg = write_config(&dir, &jwks_path, "1s");
    let (ok, all) = check(&cfg);
    assert!(ok, "{all}");
    assert!(all.contains("1 token issuer(s) with 1 key(s)"), "{all}");
    // A URL is checked, not contacted (nothing listens on port 9 of this machine).
    let url_cfg = dir.join("url.toml");
    std::fs::write(
        &url_cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("jwks_file = \"{}\"", jwks_path.display()),
            "jwks_url = \"https://127.0.0.1:9/keys\"",
        ),
    )
    .unwrap();
    let (ok, all) = check(&url_cfg);
    assert!(
        ok && all.contains("1 token issuer(s) with 0 key(s)"),
        "{all}"
    );

    let base = std::fs::read_to_string(&cfg).unwrap();
    let variants = [
        (
            base.replace(jwks_path.to_str().unwrap(), "/nonexistent/jwks.json"),
            "cannot read JWKS file",
        ),
        (
            base.replace("leeway = \"1s\"", "leeway = \"soon\""),
            "leeway",
        ),
        (
            base.replace(
                &format!("jwks_file = \"{}\"", jwks_path.display()),
                "jwks_url = \"http://login.example.test/keys\"",
            ),
            "must be an https:// URL",
        ),
        (
            base.replace(
                &format!("jwks_file = \"{}\"", jwks_path.display()),
                &format!(
                    "jwks_file = \"{}\"\njwks_refresh = \"1m\"",
                    jwks_path.display()
                ),
            ),
            "go with jwks_url",
        ),
        (
            base.replace(
                "audience = [\"api://other\", \"api://slotgate\"]",
                "audience = []",
            ),
            "audience",
        ),
        (
            base.replace("[[token_issuers]]", "[[token_issuers]]\nname2 = \"x\""),
            "unknown field",
        ),
        (
            // Users reached by tokens need an issuer.
            base.split("[[token_issuers]]").next().unwrap().to_string()
                + "[[users]]\nname = \"t\"\ntoken_roles = [\"R\"]\nkeys = [\"*\"]\n",
            "need a [[token_issuers]] entry",
        ),
    ];
    for (i, (text, why)) in variants.iter().enumerate() {
        let bad = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&bad, text).unwrap();
        let (ok, all) = check(&bad);
        assert!(
            !ok && all.contains(why),
            "variant {i}: want '{why}' in {all}"
        );
    }
    std::fs::write(
        &jwks_path,
        r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#,
    )
    .unwrap();
    let (ok, all) = check(&cfg);
    assert!(!ok && all.contains("no signing key"), "{all}");
}

#[test]
fn redis_py_credential_providers_keep_working_across_token_expiry() {
    let has_redis_py = std::process::Command::new("python3")
        .args(["-c", "import redis.auth.token, redis.credentials"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_redis_py,
        "python3 with redis-py is required: python3 -m pip install redis (scripts/test.sh does it)"
    );
    let shard = RedisServer::start();
    let dir = support::tls::temp_dir("token-redis-py");
    let key = SigningKey::ec("k1");
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwt::jwks(&[&key])).unwrap();
    let cfg = write_config(&dir, &jwks_path, "0");
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    // Tokens a second apart in expiry, from 2 s to 40 s ahead.
    let t0 = now();
    let tokens: Vec<_> = (2..40)
        .map(|s| {
            let exp = t0 + s;
            json!({"token": key.token(&claims(ISS, AUD, "oid-writer", exp)), "exp": exp})
        })
        .collect();
    let tokens_path = dir.join("tokens.json");
    std::fs::write(&tokens_path, serde_json::to_string(&tokens).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/token_refresh.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script)
        .arg(proxy.port.to_string())
        .arg("oid-writer")
        .arg(&tokens_path);
    let done = run_bounded(&mut cmd, Duration::from_secs(60));
    let out = match &done {
        Ok(f) | Err(f) => f,
    };
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(done.is_ok() && text.contains("token refresh OK"), "{text}");
}

#[test]
fn the_readme_example_token_script_and_redis_cli() {
    let shard = RedisServer::start();
    let dir = support::tls::temp_dir("token-script");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/token.sh");
    let idp = dir.join("idp");
    let keys = std::process::Command::new(script)
        .arg("keys")
        .arg(&idp)
        .output()
        .unwrap();
    assert!(
        keys.status.success(),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"requirepass = "pw"

[[token_issuers]]
name = "demo"
issuer = "https://login.example.test/slotgate-demo/v2.0"
audience = "api://slotgate"
jwks_file = "{}"

[[users]]
name = "cache-reader"
token_roles = ["CacheReader"]
keys = ["app:*"]
commands = ["+@read", "+@connection"]
"#,
            idp.join("jwks.json").display()
        ),
    )
    .unwrap();
    let proxy = Slotgate::start_with(&[&shard], &["--config", cfg.to_str().unwrap()]);
    let oid = "6f1c2a3e-0000-4000-8000-000000000001";
    let mint = |roles: &str| {
        let out = std::process::Command::new(script)
            .args(["mint", idp.to_str().unwrap(), oid, "600", roles])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let cli = |token: &str, args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &proxy.port.to_string(), "--no-auth-warning"])
            .args(["--user", oid, "--pass", token])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + &String::from_utf8_lossy(&out.stderr)
    };
    let reader = mint("CacheReader");
    assert_eq!(cli(&reader, &["ping"]), "PONG");
    assert_eq!(cli(&reader, &["get", "app:1"]), "");
    assert!(cli(&reader, &["get", "secret"]).contains("NOPERM"));
    // A token whose roles map to no user is refused.
    assert!(cli(&mint("Nobody"), &["ping"]).contains("WRONGPASS"));
}

#[test]
fn keys_from_a_jwks_url_are_downloaded_refreshed_and_fetched_again_for_an_unknown_kid() {
    let shard = RedisServer::start();
    let dir = support::tls::temp_dir("token-url");
    let (k1, k2, k3) = (
        SigningKey::ec("k1"),
        SigningKey::rsa("k2"),
        SigningKey::ec("k3"),
    );
    let idp = support::tls::JwksServer::start(&dir, &jwt::jwks(&[&k1]));
    let placeholder = dir.join("unused.json");
    let cfg = write_config(&dir, &placeholder, "1s");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("jwks_file = \"{}\"", placeholder.display()),
        &format!(
            "jwks_url = \"{}\"\njwks_ca_file = \"{}\"\njwks_refresh = \"1h\"",
            idp.url(),
            idp.ca_pem.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let proxy = polled_proxy(&shard, &cfg);
    let by = |k: &SigningKey| k.token(&claims(ISS, AUD, "oid-writer", now() + 3600));
    // Downloaded before the first client was accepted.
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k1)), OK);
    assert!(idp.hits() >= 1);

    // A new key: the first token naming it is refused and asks for a download; once that
    // is done, the key is known.
    idp.set(&jwt::jwks(&[&k1, &k2]));
    let mut c = proxy.raw();
    assert_eq!(c.call(&[b"AUTH", b"pw"]), OK);
    let refused = info_stat(&mut c, "token_auth_failures");
    let _ = auth(&mut proxy.raw(), "oid-writer", &by(&k2));
    wait_until("k2 to be accepted", Duration::from_secs(15), || {
        auth(&mut proxy.raw(), "oid-writer", &by(&k2)) == OK
    });
    assert!(info_stat(&mut c, "token_auth_failures") > refused);

    // A reload keeps the downloaded keys (no gap), and a key gone from the URL goes.
    idp.set(&jwt::jwks(&[&k3]));
    assert_eq!(c.call(&[b"SLOTGATE.RELOAD"])[0], b'+');
    wait_until("k1 to be refused", Duration::from_secs(10), || {
        auth(&mut proxy.raw(), "oid-writer", &by(&k1)) == WRONGPASS
    });
    assert_eq!(auth(&mut proxy.raw(), "oid-writer", &by(&k3)), OK);

    // Every jwks_refresh, without any client asking.
    let cfg2 = dir.join("refresh.toml");
    std::fs::write(
        &cfg2,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("jwks_refresh = \"1h\"", "jwks_refresh = \"1s\""),
    )
    .unwrap();
    let _second = Slotgate::start_with(&[&shard], &["--config", cfg2.to_str().unwrap()]);
    let before = idp.hits();
    wait_until("two timed downloads", Duration::from_secs(10), || {
        idp.hits() >= before + 2
    });
}
