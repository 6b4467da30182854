//! Who is asking for a certificate: turning the bearer token of a signing request into the SPIFFE IDs
//! its holder may be issued.
//!
//! The CA service hands each request's token to an [`Authenticator`] and signs only IDs matching the
//! [`Entitlement`] it returns. [`LocalTokens`] is the implementation for hosts and tests: a file of
//! bootstrap tokens, each with the ID patterns it grants. On Kubernetes the token is a projected
//! service-account token and [`super::kubernetes::TokenReview`] asks the API server, which maps the
//! account `system:serviceaccount:NS:SA` to `spiffe://TD/ns/NS/sa/SA`. [`Authenticators`] is what
//! the control plane runs: the bootstrap tokens first, then, for a token they do not know,
//! TokenReview. Its bootstrap tokens can be replaced while it runs ([`Authenticators::replace_local`],
//! when the control plane sees the tokens file change), and [`Authenticators::revisions`] tells
//! whoever holds a token accepted earlier (an open discovery stream) to have it checked again.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::kubernetes::TokenReview;
use remora_control_api::identity::{IdentityPattern, InvalidSpiffeId};

/// What a token's holder may be issued.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entitlement {
    /// The IDs, exact or glob.
    pub identities: Vec<IdentityPattern>,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token came with the request.
    #[error("no bearer token")]
    Missing,
    /// The token is not one the authenticator knows (or has expired).
    #[error("unknown token")]
    Unknown,
    /// The authenticator could not decide (its backend is down).
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

/// Decides what a bearer token entitles its holder to.
pub trait Authenticator: Send + Sync + 'static {
    /// The entitlement of `token` as its authority says now: a token revoked since an earlier
    /// answer is refused. Only when the authority cannot be asked may an answer it gave moments ago
    /// stand in.
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<Entitlement, AuthError>> + Send;
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It could not be read.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A line is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Bootstrap tokens from a file: one per line, `TOKEN PATTERN [PATTERN...]`, `#` starting a comment.
/// A token must be at least 16 characters; the same token may not appear twice.
#[derive(Clone, Debug, Default)]
pub struct LocalTokens {
    tokens: Vec<(String, Entitlement)>,
}

/// The shortest token accepted: short tokens can be guessed.
const MIN_TOKEN_LEN: usize = 16;

impl LocalTokens {
    /// Reads `path`.
    pub fn load(path: &Path) -> Result<LocalTokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokensError::Io { path: path.to_owned(), error })?;
        LocalTokens::parse(&text).map_err(|(line, message)| TokensError::Line { path: path.to_owned(), line, message })
    }

    /// Parses a tokens file's text; an error names the 1-based line.
    pub fn parse(text: &str) -> Result<LocalTokens, (usize, String)> {
        let mut tokens = LocalTokens::default();
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            let line = line.split('#').next().unwrap_or_default().trim();
            let mut words = line.split_whitespace();
            let Some(token) = words.next() else { continue };
            if token.len() < MIN_TOKEN_LEN {
                return Err((line_number, format!("the token must be at least {MIN_TOKEN_LEN} characters")));
            }
            let identities = words
                .map(IdentityPattern::parse)
                .collect::<Result<Vec<_>, InvalidSpiffeId>>()
                .map_err(|e| (line_number, e.to_string()))?;
            if identities.is_empty() {
                return Err((line_number, "the token grants no identity; want TOKEN PATTERN [PATTERN...]".into()));
            }
            tokens = tokens.with(token, identities).map_err(|m| (line_number, m))?;
        }
        Ok(tokens)
    }

    /// Adds `token`, granting `identities`.
    pub fn with(mut self, token: &str, identities: Vec<IdentityPattern>) -> Result<LocalTokens, String> {
        if self.tokens.iter().any(|(known, _)| known == token) {
            return Err("the same token appears twice".into());
        }
        self.tokens.push((token.to_owned(), Entitlement { identities }));
        Ok(self)
    }

    /// How many tokens it holds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

impl Authenticator for LocalTokens {
    async fn authenticate(&self, token: &str) -> Result<Entitlement, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        // Every known token is compared, each in constant time, so the time taken says nothing about
        // how much of a guess was right.
        let mut found = None;
        for (known, entitlement) in &self.tokens {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(entitlement);
            }
        }
        found.cloned().ok_or(AuthError::Unknown)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn tokens_grant_their_identities() {
        let tokens = LocalTokens::parse(
            "# bootstrap tokens\n\
             0123456789abcdef spiffe://cluster.local/ns/shop/* # the shop\n\
             \n\
             fedcba9876543210 spiffe://cluster.local/ns/a/sa/b spiffe://cluster.local/ns/a/sa/c\n",
        )
        .unwrap();
        assert_eq!(tokens.len(), 2);
        let shop = tokens.authenticate("0123456789abcdef").await.unwrap();
        assert!(shop.identities[0].matches("spiffe://cluster.local/ns/shop/sa/web"));
        assert_eq!(tokens.authenticate("fedcba9876543210").await.unwrap().identities.len(), 2);
        assert!(matches!(tokens.authenticate("0123456789abcdeX").await, Err(AuthError::Unknown)));
        assert!(matches!(tokens.authenticate("").await, Err(AuthError::Missing)));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(LocalTokens::parse("short spiffe://td/x").unwrap_err().0, 1);
        let error = LocalTokens::parse("\n0123456789abcdef\n").unwrap_err();
        assert_eq!(error.0, 2);
        assert!(error.1.contains("grants no identity"), "{}", error.1);
        assert!(LocalTokens::parse("0123456789abcdef web").unwrap_err().1.contains("not a SPIFFE ID"));
        let twice = "0123456789abcdef spiffe://td/a\n0123456789abcdef spiffe://td/b\n";
        assert_eq!(LocalTokens::parse(twice).unwrap_err(), (2, "the same token appears twice".into()));
    }
}

/// The bearer token of a request's `authorization` metadata (empty when there is none).
pub(crate) fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The control plane's authenticators: bootstrap tokens, then (if configured) TokenReview for the
/// tokens those do not know.
#[derive(Debug)]
pub struct Authenticators {
    /// The bootstrap tokens (maybe none), replaced whole when their file changes.
    local: ArcSwap<LocalTokens>,
    /// Kubernetes service-account tokens.
    kubernetes: Option<TokenReview>,
    /// Counts the replacements of `local`.
    revision: watch::Sender<u64>,
}

impl Default for Authenticators {
    fn default() -> Self {
        Authenticators::new(LocalTokens::default(), None)
    }
}

impl Authenticators {
    /// Bootstrap tokens `local`, then `kubernetes` for the tokens they do not know.
    pub fn new(local: LocalTokens, kubernetes: Option<TokenReview>) -> Authenticators {
        Authenticators { local: ArcSwap::from_pointee(local), kubernetes, revision: watch::Sender::new(0) }
    }

    /// Serves `tokens` as the bootstrap tokens from now on: a token no longer among them is refused
    /// from its next check.
    pub fn replace_local(&self, tokens: LocalTokens) {
        self.local.store(Arc::new(tokens));
        self.revision.send_modify(|revision| *revision += 1);
    }

    /// Changes each time the bootstrap tokens are replaced: a token accepted before may not be now.
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

impl Authenticator for Authenticators {
    /// The bootstrap tokens first; a token they do not know goes to TokenReview.
    async fn authenticate(&self, token: &str) -> Result<Entitlement, AuthError> {
        let local = self.local.load_full();
        match (local.authenticate(token).await, &self.kubernetes) {
            (Err(AuthError::Unknown), Some(kubernetes)) => kubernetes.authenticate(token).await,
            (outcome, _) => outcome,
        }
    }
}
