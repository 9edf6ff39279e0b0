//! The cost of a token AUTH's check (`Issuers::login`: parse, issuer and key lookup,
//! signature, claims, user mapping) for RS256 (2048-bit) and ES256 tokens, and of the
//! password check it comes after. An RSA key comes from `openssl` (ring cannot generate one).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use slotgate::auth::{UserConfig, Users};
use slotgate::token::{IssuerConfig, Issuers};

#[path = "../tests/support/jwt.rs"]
mod jwt;

const ISS: &str = "https://login.example.test/bench/v2.0";

fn setup() -> (Issuers, Users, String, String) {
    let (rsa, ec) = (jwt::SigningKey::rsa("r"), jwt::SigningKey::ec("e"));
    let dir = std::env::temp_dir().join(format!("slotgate-bench-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, jwt::jwks(&[&rsa, &ec])).unwrap();
    let issuers: Vec<IssuerConfig> = toml::from_str::<toml::Table>(&format!(
        "[[i]]\nname = \"b\"\nissuer = \"{ISS}\"\naudience = \"api://b\"\njwks_file = \"{}\"\n",
        jwks.display()
    ))
    .unwrap()["i"]
        .clone()
        .try_into()
        .unwrap();
    let issuers = Issuers::build(&issuers).unwrap();
    let users: Vec<UserConfig> = toml::from_str::<toml::Table>(
        "[[u]]\nname = \"app\"\ntoken_subjects = [\"oid-1\"]\nkeys = [\"*\"]\n",
    )
    .unwrap()["u"]
        .clone()
        .try_into()
        .unwrap();
    let users = Users::build(Some("pw"), &users).unwrap();
    let claims = json!({"iss": ISS, "aud": "api://b", "oid": "oid-1", "exp": jwt::now() + 86400,
                        "nbf": jwt::now() - 60, "roles": ["CacheReader"]});
    (issuers, users, rsa.token(&claims), ec.token(&claims))
}

fn token_auth(c: &mut Criterion) {
    let (issuers, users, rs256, es256) = setup();
    let mut g = c.benchmark_group("token_auth");
    for (name, token) in [("rs256", &rs256), ("es256", &es256)] {
        assert!(issuers.login(b"oid-1", token.as_bytes(), &users).is_ok());
        g.bench_function(name, |b| {
            b.iter(|| issuers.login(black_box(b"oid-1"), black_box(token.as_bytes()), &users))
        });
    }
    g.bench_function("password", |b| {
        b.iter(|| users.authenticate(black_box(b"default"), black_box(b"pw")))
    });
    g.finish();
}

criterion_group!(benches, token_auth);
criterion_main!(benches);
