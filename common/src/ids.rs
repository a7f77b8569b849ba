//! Identifier newtypes.
//!
//! A [`JobId`] is the content address of a job: 128 bits of a BLAKE3 hash of what the job runs
//! (see `gridq_master::sweep` for the exact encoding), written as 32 lowercase hex digits. It is
//! stable across machines and days, which is what lets a resubmitted sweep skip finished jobs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The identity of one job: 16 bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId([u8; 16]);

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job id `{input}`: expected 32 hexadecimal digits")]
pub struct ParseIdError {
    input: String,
}

impl JobId {
    /// Number of hex digits in the textual form.
    pub const HEX_LEN: usize = 32;

    /// Wraps raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Writes the 32 hex digits into `out` without allocating.
    pub fn encode_hex(&self, out: &mut [u8; Self::HEX_LEN]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, byte) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(byte >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; Self::HEX_LEN];
        self.encode_hex(&mut buf);
        // The buffer holds ASCII hex digits only.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            input: s.chars().take(64).collect(),
        };
        let bytes = s.as_bytes();
        if bytes.len() != Self::HEX_LEN {
            return Err(err());
        }
        let mut out = [0u8; 16];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(err)?;
            let lo = hex_value(pair[1]).ok_or_else(err)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; Self::HEX_LEN];
        self.encode_hex(&mut buf);
        serializer.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = JobId::from_bytes([
            0x00, 0x01, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xa0, 0xb0,
            0xc0, 0xde,
        ]);
        let text = id.to_string();
        assert_eq!(text, "00017f80ff10203040506070a0b0c0de");
        assert_eq!(text.parse::<JobId>().unwrap(), id);
        assert_eq!(
            "00017F80FF10203040506070A0B0C0DE".parse::<JobId>().unwrap(),
            id
        );
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            "abc",
            "g0017f80ff10203040506070a0b0c0de",
            "00017f80ff10203040506070a0b0c0de0",
        ] {
            let err = bad.parse::<JobId>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid job id `{bad}`: expected 32 hexadecimal digits")
            );
        }
    }

    #[test]
    fn serde_as_string() {
        let id = JobId::from_bytes([0xab; 16]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(16)));
        assert_eq!(serde_json::from_str::<JobId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<JobId>("\"zz\"").is_err());
    }
}

/// A sweep's identity: its validated name (letters, digits, `-`, `_`, `.`; at most 128).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SweepId(String);

/// A worker's identity: `host-pid-random`, unique per worker process.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerId(String);

/// Why a string is not a valid sweep or worker id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{input}`: expected 1 to 128 letters, digits, `-`, `_` or `.`")]
pub struct InvalidName {
    what: &'static str,
    input: String,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

macro_rules! name_id {
    ($ty:ident, $what:literal) => {
        impl $ty {
            /// Validates and wraps a name.
            pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
                let name = name.into();
                if valid_name(&name) {
                    Ok(Self(name))
                } else {
                    Err(InvalidName {
                        what: $what,
                        input: name.chars().take(64).collect(),
                    })
                }
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.0
            }
        }

        impl FromStr for $ty {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.0)
            }
        }
    };
}

name_id!(SweepId, "sweep name");
name_id!(WorkerId, "worker id");

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert_eq!(SweepId::new("train-1.a_b").unwrap().as_str(), "train-1.a_b");
        assert_eq!(
            SweepId::new("a b").unwrap_err().to_string(),
            "invalid sweep name `a b`: expected 1 to 128 letters, digits, `-`, `_` or `.`"
        );
        assert!(WorkerId::new("").is_err());
        assert!(serde_json::from_str::<SweepId>("\"x/y\"").is_err());
        assert_eq!(
            serde_json::to_string(&WorkerId::new("h-1").unwrap()).unwrap(),
            "\"h-1\""
        );
    }
}
