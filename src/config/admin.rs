//! `[server]` settings of the admin listener: its bearer token, from the file or inline.
use std::path::Path;

use super::build::{relative_to, Loader};
use super::file::ServerFile;

/// `admin_token` or `admin_token_file` (read now, so a missing file fails `check`). Short
/// tokens are refused: the token guards purges of every cached response.
pub(super) fn admin_token(
    ld: &mut Loader,
    f: &ServerFile,
    config: &Path,
) -> Option<std::sync::Arc<str>> {
    let (token, span) = match (&f.admin_token, &f.admin_token_file) {
        (None, None) => return None,
        (Some(t), Some(_)) => {
            ld.err(
                t.span(),
                "[server]",
                "`admin_token` and `admin_token_file` exclude each other",
            );
            return None;
        }
        (Some(t), None) => (t.get_ref().trim().to_string(), t.span()),
        (None, Some(p)) => {
            let file = relative_to(config, p.get_ref());
            match std::fs::read_to_string(&file) {
                Ok(s) => (s.trim().to_string(), p.span()),
                Err(e) => {
                    ld.err(
                        p.span(),
                        "[server]",
                        format!("admin_token_file {}: {e}", file.display()),
                    );
                    return None;
                }
            }
        }
    };
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        ld.err(
            span,
            "[server]",
            "the admin token must be at least 16 visible ASCII characters",
        );
        return None;
    }
    Some(token.into())
}
