//! Where jwt_auth's keys come from: PEM and JWK(S) documents, and a JWKS URL fetched with
//! the gateway's own client, at most once per `jwks_min_refresh`.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use pingora_http::RequestHeader;
use serde_json::Value;

use crate::subrequest::{Client, Target};

/// One verification key, with what it may be used for.
#[derive(Clone)]
pub struct KeyEntry {
    pub kid: Option<String>,
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
    /// A hash of the key's JWK: which key verified a cached token, so a JWKS refresh that
    /// drops the key drops the tokens it verified (0 for PEM keys, which only a reload
    /// replaces, and a reload starts a new cache).
    pub id: u64,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("family", &self.key.family())
            .finish()
    }
}

/// Keys of a JWK Set document, or of a single JWK. Keys this build cannot use (ES512,
/// encryption keys) are skipped with a note in `skipped`.
pub fn parse_jwks(text: &str) -> std::result::Result<(Vec<KeyEntry>, Vec<String>), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = match v.get("keys") {
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err("`keys` must be an array".into()),
        None => vec![v],
    };
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, k) in list.into_iter().enumerate() {
        let name = k
            .get("kid")
            .and_then(Value::as_str)
            .map_or_else(|| format!("key {i}"), |s| format!("key {s:?}"));
        if k.get("use").and_then(Value::as_str) == Some("enc") {
            skipped.push(format!("{name}: an encryption key"));
            continue;
        }
        let id = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.to_string().hash(&mut h);
            h.finish()
        };
        let jwk: Jwk = match serde_json::from_value(k) {
            Ok(j) => j,
            Err(e) => {
                skipped.push(format!("{name}: {e}"));
                continue;
            }
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| Algorithm::try_from(a).ok());
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push(KeyEntry {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
                id,
            }),
            Err(e) => skipped.push(format!("{name}: {e}")),
        }
    }
    Ok((keys, skipped))
}

pub(super) fn pem_key(pem: &[u8]) -> std::result::Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem)
        .or_else(|_| DecodingKey::from_ec_pem(pem))
        .or_else(|_| DecodingKey::from_ed_pem(pem))
        .map_err(|_| "not an RSA, EC (P-256/P-384) or Ed25519 public key in PEM".to_string())
}

pub(super) struct Remote {
    pub(super) target: Target,
    pub(super) client: Client,
    pub(super) keys: ArcSwap<Vec<KeyEntry>>,
    /// Milliseconds since `epoch` of the last successful fetch; 0 = never.
    pub(super) fetched: AtomicU64,
    /// Of the last attempt, successful or not.
    pub(super) attempted: AtomicU64,
    pub(super) refreshing: AtomicBool,
    pub(super) refresh: Duration,
    pub(super) min_refresh: Duration,
    pub(super) epoch: Instant,
    pub(super) fetch_lock: tokio::sync::Mutex<()>,
}

impl Remote {
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Fetches the key set now, unless another fetch finished while we waited for the lock.
    pub(super) async fn fetch(&self, since: u64) {
        let _g = self.fetch_lock.lock().await;
        if self.attempted.load(Ordering::Relaxed) > since {
            return;
        }
        self.attempted.store(self.now_ms(), Ordering::Relaxed);
        let req = match RequestHeader::build("GET", self.target.path.as_bytes(), Some(2)) {
            Ok(r) => r,
            Err(_) => return,
        };
        let result = self
            .client
            .send(&self.target, req, Duration::from_secs(5), 1 << 20)
            .await;
        match result {
            Ok(r) if r.header.status.is_success() => {
                match parse_jwks(&String::from_utf8_lossy(&r.body)) {
                    Ok((keys, skipped)) => {
                        for s in skipped {
                            log::debug!("jwks {}: skipped {s}", self.target.host);
                        }
                        log::info!("jwks {}: {} keys", self.target.host, keys.len());
                        self.keys.store(Arc::new(keys));
                        self.fetched.store(self.now_ms(), Ordering::Relaxed);
                    }
                    Err(e) => log::warn!("jwks {}: {e}", self.target.host),
                }
            }
            Ok(r) => log::warn!("jwks {}: answered {}", self.target.host, r.header.status),
            Err(e) => log::warn!("jwks {}: {e}", self.target.host),
        }
    }
}
