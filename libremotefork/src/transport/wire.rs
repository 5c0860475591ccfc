//! The TCP page protocol between nodes (documented in
//! `docs/PAGE_PROTOCOL.md`): a handshake naming the seed and proving its
//! key, then pipelined read requests of many ranges each. All integers are
//! little-endian. Pure encoding and checking, shared by the page server
//! (forkd) and the TCP page source.

/// Handshake magic.
pub const MAGIC: [u8; 4] = *b"RFPG";
/// Protocol version.
pub const VERSION: u16 = 1;
/// Size of the client's handshake.
pub const HELLO_LEN: usize = 40;
/// Most ranges in one request.
pub const MAX_RANGES: u32 = 1024;
/// Largest single range.
pub const MAX_RANGE_LEN: u32 = 4 << 20;
/// Largest total of one request.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;

/// Handshake answers.
pub mod hello_status {
    /// Accepted.
    pub const OK: u8 = 0;
    /// No such seed here (never, or dropped).
    pub const UNKNOWN_SEED: u8 = 1;
    /// The key does not match.
    pub const WRONG_KEY: u8 = 2;
    /// Not this protocol or version.
    pub const BAD_HELLO: u8 = 3;
}

/// Read answers.
pub mod read_status {
    /// Data follows.
    pub const OK: u8 = 0;
    /// A range lies outside the page store.
    pub const OUT_OF_RANGE: u8 = 1;
    /// Too many ranges or bytes.
    pub const TOO_LARGE: u8 = 2;
    /// The seed was dropped.
    pub const SEED_GONE: u8 = 3;
    /// The server could not read its image.
    pub const READ_ERROR: u8 = 4;
}

/// The client's handshake: magic, version, seed id (16 hex chars), key (16 bytes).
pub fn hello(seed_id: &str, key: &[u8; 16]) -> Option<[u8; HELLO_LEN]> {
    let id = seed_id.as_bytes();
    if id.len() != 16 {
        return None;
    }
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..24].copy_from_slice(id);
    b[24..40].copy_from_slice(key);
    Some(b)
}

/// Why a client's handshake is refused. Its text is sent back to the
/// client in the `BAD_HELLO` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The magic is not [`MAGIC`].
    #[error("not a remotefork page channel (bad magic)")]
    BadMagic,
    /// The version is not [`VERSION`].
    #[error("unsupported page protocol version")]
    Version,
    /// The seed id has bytes outside ASCII.
    #[error("seed id is not ASCII")]
    IdNotAscii,
    /// The seed id has characters other than hex digits.
    #[error("seed id is not hex")]
    IdNotHex,
}

/// Parse a handshake: (seed id, key), or why not.
pub fn parse_hello(b: &[u8; HELLO_LEN]) -> Result<(String, [u8; 16]), HelloError> {
    if b[..4] != MAGIC {
        return Err(HelloError::BadMagic);
    }
    if u16::from_le_bytes([b[4], b[5]]) != VERSION {
        return Err(HelloError::Version);
    }
    let id = std::str::from_utf8(&b[8..24]).map_err(|_| HelloError::IdNotAscii)?;
    if !id.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(HelloError::IdNotHex);
    }
    let mut key = [0u8; 16];
    key.copy_from_slice(&b[24..40]);
    Ok((id.to_string(), key))
}

/// The server's handshake answer: status, image size, message.
pub fn hello_answer(status: u8, image_bytes: u64, msg: &str) -> Vec<u8> {
    let mut v = vec![status, 0, 0, 0];
    v.extend_from_slice(&image_bytes.to_le_bytes());
    v.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// Hex key to bytes.
pub fn key_bytes(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// A read request: id, then (offset, len) ranges.
pub fn request(req_id: u32, ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + ranges.len() * 12);
    v.extend_from_slice(&req_id.to_le_bytes());
    v.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for (o, l) in ranges {
        v.extend_from_slice(&o.to_le_bytes());
        v.extend_from_slice(&l.to_le_bytes());
    }
    v
}

/// Check a request's ranges against the page store: the read status.
pub fn check_ranges(ranges: &[(u64, u32)], image_bytes: u64) -> u8 {
    if ranges.is_empty() || ranges.len() as u32 > MAX_RANGES {
        return read_status::TOO_LARGE;
    }
    let mut total = 0u64;
    for (o, l) in ranges {
        if *l > MAX_RANGE_LEN {
            return read_status::TOO_LARGE;
        }
        total += *l as u64;
        match o.checked_add(*l as u64) {
            Some(end) if end <= image_bytes => {}
            _ => return read_status::OUT_OF_RANGE,
        }
    }
    if total > MAX_REQUEST_BYTES {
        return read_status::TOO_LARGE;
    }
    read_status::OK
}

/// A response header: id, status, length of what follows.
pub fn response_header(req_id: u32, status: u8, len: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&req_id.to_le_bytes());
    h[4] = status;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// The range count that asks for the seed's descriptor instead of pages
/// (`forkd` 0.1 from this version on; an older server answers
/// [`read_status::TOO_LARGE`]). The answer's data is
/// [`descriptor_bundle`].
pub const DESCRIPTOR_REQUEST: u32 = u32::MAX;

/// A descriptor request (no ranges follow).
pub fn descriptor_request(req_id: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&req_id.to_le_bytes());
    v.extend_from_slice(&DESCRIPTOR_REQUEST.to_le_bytes());
    v
}

/// The answer to a descriptor request: the descriptor's length (u32), the
/// descriptor, then the recorded working set (the rest, maybe empty).
pub fn descriptor_bundle(descriptor: &[u8], working_set: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + descriptor.len() + working_set.len());
    v.extend_from_slice(&(descriptor.len() as u32).to_le_bytes());
    v.extend_from_slice(descriptor);
    v.extend_from_slice(working_set);
    v
}

/// Split a [`descriptor_bundle`]: (descriptor, working set).
pub fn parse_descriptor_bundle(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let rest = &b[4..];
    (n <= rest.len()).then(|| rest.split_at(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_garbage() {
        let k = key_bytes("000102030405060708090a0b0c0d0e0f").unwrap();
        let h = hello("0123456789abcdef", &k).unwrap();
        assert_eq!(
            parse_hello(&h).unwrap(),
            ("0123456789abcdef".to_string(), k)
        );
        let mut bad = h;
        bad[0] = b'X';
        assert_eq!(parse_hello(&bad), Err(HelloError::BadMagic));
        let mut bad = h;
        bad[4] = 9;
        assert_eq!(parse_hello(&bad), Err(HelloError::Version));
        let mut bad = h;
        bad[10] = b'z';
        assert_eq!(parse_hello(&bad), Err(HelloError::IdNotHex));
        // The refusal's text goes on the wire: it keeps its words.
        assert_eq!(
            HelloError::BadMagic.to_string(),
            "not a remotefork page channel (bad magic)"
        );
        assert!(hello("short", &k).is_none());
        assert!(key_bytes("zz").is_none());
    }

    #[test]
    fn ranges_are_bounded() {
        assert_eq!(check_ranges(&[(0, 4096)], 8192), read_status::OK);
        assert_eq!(
            check_ranges(&[(4096, 8192)], 8192),
            read_status::OUT_OF_RANGE
        );
        assert_eq!(
            check_ranges(&[(u64::MAX - 10, 4096)], 8192),
            read_status::OUT_OF_RANGE
        );
        assert_eq!(
            check_ranges(&[(0, MAX_RANGE_LEN + 1)], u64::MAX),
            read_status::TOO_LARGE
        );
        assert_eq!(check_ranges(&[], 8192), read_status::TOO_LARGE);
        let many = vec![(0u64, 4096u32); MAX_RANGES as usize + 1];
        assert_eq!(check_ranges(&many, 1 << 30), read_status::TOO_LARGE);
        let big = vec![(0u64, MAX_RANGE_LEN); 5];
        assert_eq!(check_ranges(&big, 1 << 30), read_status::TOO_LARGE);
        assert_eq!(request(7, &[(1, 2)]).len(), 8 + 12);
        assert_eq!(&response_header(7, 3, 9)[..5], &[7, 0, 0, 0, 3]);
        let b = descriptor_bundle(b"desc", b"ws");
        assert_eq!(
            parse_descriptor_bundle(&b),
            Some((&b"desc"[..], &b"ws"[..]))
        );
        assert_eq!(parse_descriptor_bundle(&b[..5]), None);
        assert_eq!(&descriptor_request(5)[4..], &u32::MAX.to_le_bytes());
    }
}
