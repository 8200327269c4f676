//! OCSP stapling: a DER response from a file, checked when the config is loaded (a successful
//! answer, for this certificate, signed by its issuer or a responder it named, not revoked) and
//! stapled only while it is current.
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use openssl::ocsp::{OcspCertId, OcspCertStatus, OcspFlag, OcspResponse, OcspResponseStatus};
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::X509;

/// A response to staple, and until when (its nextUpdate; none: as long as it is loaded).
#[derive(Debug)]
pub struct Staple {
    pub der: Vec<u8>,
    until: Option<u64>,
}

impl Staple {
    pub fn current(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.until.is_none_or(|u| now < u)
    }
}

pub enum Read {
    Staple(Staple),
    /// Not stapled, and why (a warning for `check`).
    Skip(String),
}

/// Reads `path` as the OCSP response for `leaf`, whose issuer is `issuer`.
pub fn read(path: &Path, leaf: &X509, issuer: &X509) -> Result<Read, String> {
    let p = path.display();
    let der = std::fs::read(path).map_err(|e| format!("{p}: {e}"))?;
    let resp = OcspResponse::from_der(&der).map_err(|_| format!("{p}: not a DER OCSP response"))?;
    if resp.status() != OcspResponseStatus::SUCCESSFUL {
        return Err(format!(
            "{p}: the responder did not answer with a status (response status {})",
            resp.status().as_raw()
        ));
    }
    let basic = resp
        .basic()
        .map_err(|_| format!("{p}: no basic OCSP response in it"))?;
    // Signed by the issuer itself, or by a responder certificate the issuer signed.
    let verified = (|| {
        let mut store = X509StoreBuilder::new().ok()?;
        store.add_cert(issuer.clone()).ok()?;
        store.set_flags(X509VerifyFlags::PARTIAL_CHAIN).ok()?;
        let mut certs = Stack::new().ok()?;
        certs.push(issuer.clone()).ok()?;
        basic
            .verify(&certs, &store.build(), OcspFlag::TRUST_OTHER)
            .ok()
    })();
    if verified.is_none() {
        return Err(format!(
            "{p}: its signature is not the certificate issuer's (nor a responder's it named)"
        ));
    }
    let id = OcspCertId::from_cert(openssl::hash::MessageDigest::sha1(), leaf, issuer)
        .map_err(|e| format!("{p}: {e}"))?;
    let Some(status) = basic.find_status(&id) else {
        return Err(format!(
            "{p}: the OCSP response is not for this certificate"
        ));
    };
    if status.status == OcspCertStatus::REVOKED {
        return Err(format!("{p}: the certificate is revoked"));
    }
    if status.status != OcspCertStatus::GOOD {
        return Ok(Read::Skip(format!(
            "{p}: the responder does not know the certificate; not stapled"
        )));
    }
    if status.check_validity(300, None).is_err() {
        return Ok(Read::Skip(format!(
            "{p}: the OCSP response is out of date; not stapled until it is renewed (and reloaded)"
        )));
    }
    let until = status.next_update().and_then(|t| unix_time(&t.to_string()));
    Ok(Read::Staple(Staple { der, until }))
}

/// Seconds since the epoch of OpenSSL's printed time (`Dec  9 18:00:00 2026 GMT`).
fn unix_time(s: &str) -> Option<u64> {
    let mut it = s.split_whitespace();
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| Some(*m) == it.clone().next())? as i64
        + 1;
    it.next();
    let day: i64 = it.next()?.parse().ok()?;
    let hms: Vec<i64> = it
        .next()?
        .split(':')
        .map(|x| x.split('.').next().unwrap_or(x).parse().ok())
        .collect::<Option<_>>()?;
    let year: i64 = it.next()?.parse().ok()?;
    let [h, m, sec] = hms[..] else {
        return None;
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + m * 60 + sec).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn printed_times() {
        assert_eq!(super::unix_time("Jan  1 00:00:00 1970 GMT"), Some(0));
        assert_eq!(
            super::unix_time("Dec  9 18:00:05 2026 GMT"),
            Some(1_796_839_205)
        );
        assert_eq!(
            super::unix_time("Feb 29 12:00:00 2024 GMT"),
            Some(1_709_208_000)
        );
        assert_eq!(super::unix_time("garbage"), None);
    }
}
