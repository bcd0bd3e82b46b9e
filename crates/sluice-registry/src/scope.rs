//! What an API key may do (SPEC §3): `full`, `write` (ingest only: the key a web page or an
//! SDK carries) or `read` (reads and search only).

use std::fmt;
use std::str::FromStr;

/// A key's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyScope {
    Full,
    Write,
    Read,
}

/// What a request does, for [`KeyScope::allows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Ingest: users, events, Segment calls, webhooks.
    Write,
    /// Profiles, events and search.
    Read,
    /// What only a full key does (forgetting a user).
    Admin,
}

impl KeyScope {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::Full => "full",
            KeyScope::Write => "write",
            KeyScope::Read => "read",
        }
    }

    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (KeyScope::Full, _) | (KeyScope::Write, Access::Write) | (KeyScope::Read, Access::Read)
        )
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyScope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "full" => Ok(KeyScope::Full),
            "write" => Ok(KeyScope::Write),
            "read" => Ok(KeyScope::Read),
            other => Err(format!("scope {other:?}: expected full, write or read")),
        }
    }
}

/// A key as `sluice keys list` shows it: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    /// The first 12 hex digits of the key's SHA-256: what `sluice keys revoke` takes.
    pub id: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub scope: KeyScope,
    /// Unix seconds.
    pub created_at: i64,
}

impl serde::Serialize for KeyScope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_allow_what_they_say() {
        assert!(KeyScope::Full.allows(Access::Admin));
        assert!(KeyScope::Write.allows(Access::Write));
        assert!(!KeyScope::Write.allows(Access::Read));
        assert!(!KeyScope::Write.allows(Access::Admin));
        assert!(KeyScope::Read.allows(Access::Read));
        assert!(!KeyScope::Read.allows(Access::Write));
        for scope in [KeyScope::Full, KeyScope::Write, KeyScope::Read] {
            assert_eq!(scope.as_str().parse::<KeyScope>(), Ok(scope));
        }
        assert!("admin".parse::<KeyScope>().is_err());
    }
}
