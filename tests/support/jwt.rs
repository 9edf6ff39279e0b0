//! Signing keys and JWT access tokens made in the tests: an RSA key from `openssl` (ring
//! cannot generate RSA keys) and a P-256 key from ring, their JWKS, and tokens signed with
//! ring directly (so a test can also make what no JWT library would: `alg: none`, a
//! tampered payload, a header that lies about its algorithm).

#![allow(dead_code)]

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A signing key with its `kid`.
pub struct SigningKey {
    pub kid: String,
    pair: Pair,
}

impl SigningKey {
    /// A fresh 2048-bit RSA key (RS256).
    pub fn rsa(kid: &str) -> Self {
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl is needed to make RSA test keys (apt-get install openssl)");
        assert!(out.status.success(), "openssl genpkey failed");
        // OpenSSL 3 writes an RSA key in DER as PKCS#1.
        let pair = RsaKeyPair::from_der(&out.stdout).expect("PKCS#1 RSA key");
        SigningKey {
            kid: kid.into(),
            pair: Pair::Rsa(pair),
        }
    }

    /// A fresh P-256 key (ES256).
    pub fn ec(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        SigningKey {
            kid: kid.into(),
            pair: Pair::Ec(pair),
        }
    }

    pub fn alg(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::Ec(_) => "ES256",
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(k) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "use": "sig", "kid": self.kid, "n": b64(&c.n), "e": b64(&c.e)})
            }
            Pair::Ec(k) => {
                let point = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "use": "sig", "kid": self.kid,
                       "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
        }
    }

    /// Signs `signing_input` (`header.payload`).
    pub fn signature(&self, signing_input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, signing_input, &mut sig)
                    .unwrap();
                sig
            }
            Pair::Ec(k) => k.sign(&rng, signing_input).unwrap().as_ref().to_vec(),
        }
    }

    /// A token with this key's `alg` and `kid`.
    pub fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A token with any header, signed by this key.
    pub fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.signature(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// Claims of a token for `oid` from `iss` to `aud`, expiring at `exp`.
pub fn claims(iss: &str, aud: &str, oid: &str, exp: u64) -> Value {
    json!({"iss": iss, "aud": aud, "oid": oid, "exp": exp, "nbf": now() - 60, "iat": now() - 60})
}
