//! Standard base64 (RFC 4648, with `=` padding) for binary data in JSON
//! payloads (file contents, logs), over the `base64` crate (no dependencies
//! of its own, so the agent stays a small static binary).

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, DecodeError, Engine as _};

/// A string that is not valid padded base64.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Base64Error {
    /// The length is not a multiple of 4.
    #[error("base64 length {0} is not a multiple of 4")]
    Length(usize),
    /// A character outside the alphabet, or misplaced padding.
    #[error("invalid base64 character at offset {0}")]
    Char(usize),
}

/// The standard alphabet with `=` padding, written on encode and required
/// (canonical) on decode. Unused low bits of the last symbol are ignored,
/// as the hand-written decoder this replaces did.
const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

/// Encodes `data` as padded base64.
pub fn encode(data: &[u8]) -> String {
    ENGINE.encode(data)
}

/// Decodes padded base64.
pub fn decode(s: &str) -> Result<Vec<u8>, Base64Error> {
    // Checked first: a wrong length is reported as such, whatever the characters.
    if !s.len().is_multiple_of(4) {
        return Err(Base64Error::Length(s.len()));
    }
    ENGINE.decode(s).map_err(|e| match e {
        DecodeError::InvalidByte(offset, _) | DecodeError::InvalidLastSymbol { offset, .. } => {
            Base64Error::Char(offset)
        }
        DecodeError::InvalidLength(len) => Base64Error::Length(len),
        // Not reachable with a length that is a multiple of 4.
        DecodeError::InvalidPadding => Base64Error::Char(s.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in cases {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn binary_round_trip() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        assert_eq!(decode(&encode(&data)).unwrap(), data);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("abc"), Err(Base64Error::Length(3)));
        assert_eq!(decode("ab!d"), Err(Base64Error::Char(2)));
        assert!(decode("a===").is_err());
        assert!(decode("Zg==Zm8=").is_err());
        assert!(decode("Z=g=").is_err());
    }
}
