//! Unix-socket connections whose HTTP/2 requests carry an `:authority`
//! that is no URI authority get `localhost` instead, before the HTTP/2
//! server sees them.
//!
//! Why: for a `unix:PATH` target, gRPC C core (Python's `grpcio` since
//! 1.57, Ruby, PHP, C++) sends the percent-encoded socket path as
//! `:authority` (`tmp%2Fforkd%2Fforkd.sock`). `h2` parses `:authority` with
//! `http::uri::Authority`, which refuses a `%` in a host name, and resets
//! the stream with `PROTOCOL_ERROR`: every call fails with `INTERNAL:
//! Received RST_STREAM with error code 1` unless the caller overrides the
//! channel's authority. Over TCP the authority is `HOST:PORT` and nothing
//! is changed (this wrapper is only put on the Unix socket).
//!
//! How: the client-to-server byte stream is read frame by frame. Every
//! header block (HEADERS and its CONTINUATIONs) is decoded with HPACK, the
//! `:authority` replaced if it does not parse, and the block written again
//! with literal fields that never touch the dynamic table (so the server's
//! decoder state stays trivially in step), split into frames no larger
//! than the smallest maximum frame size HTTP/2 allows. Every other frame,
//! and the server-to-client direction, pass through unchanged. A
//! connection that does not start with the HTTP/2 preface is passed
//! through untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's floor: every HTTP/2 peer accepts frames this large.
const MAX_FRAME: usize = 16_384;
/// The HPACK dynamic table size forkd's server decoder allows (the default).
const TABLE_SIZE: usize = 4096;
/// A header block (all its frames) larger than this closes the connection.
const MAX_BLOCK: usize = 1 << 20;
/// What a bad `:authority` becomes: the value gRPC's own Rust, Go and
/// Node clients send on Unix sockets.
pub const REPLACEMENT: &str = "localhost";

/// Why a connection's byte stream could not be rewritten (it is closed).
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// A header block did not decode.
    #[error("HTTP/2 header block does not decode: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
    /// A frame's padding or priority fields overrun it.
    #[error("malformed HTTP/2 HEADERS frame on stream {0}")]
    Malformed(u32),
    /// A header block grew past `MAX_BLOCK` bytes.
    #[error("HTTP/2 header block on stream {0} is larger than {MAX_BLOCK} bytes")]
    TooLarge(u32),
    /// Another frame came between a HEADERS frame and its last CONTINUATION.
    #[error("HTTP/2 frame of type {0} inside the header block of stream {1}")]
    Interleaved(u8, u32),
}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

enum Phase {
    /// Matching the client preface.
    Preface,
    Frames,
    /// Not HTTP/2 with prior knowledge: bytes go through as they are.
    Passthrough,
}

/// A HEADERS frame waiting for its CONTINUATION frames.
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// The client-to-server rewriting, as a pure byte transformation: bytes
/// in with [`Rewriter::feed`], bytes out of [`Rewriter::ready`] and [`Rewriter::consume`].
pub struct Rewriter {
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    /// How much of `output` has been taken.
    taken: usize,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<Pending>,
    /// Authorities replaced so far (for tests and a debug log).
    pub replaced: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            phase: Phase::Preface,
            input: Vec::new(),
            output: Vec::new(),
            taken: 0,
            decoder,
            pending: None,
            replaced: 0,
        }
    }
}

impl Rewriter {
    /// Take in bytes from the client; what can be passed on is queued.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), RewriteError> {
        if let Phase::Passthrough = self.phase {
            self.output.extend_from_slice(data);
            return Ok(());
        }
        self.input.extend_from_slice(data);
        if let Phase::Preface = self.phase {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                // HTTP/1 or garbage: the server answers it, not us.
                self.phase = Phase::Passthrough;
                self.output.append(&mut self.input);
                return Ok(());
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.output.extend_from_slice(PREFACE);
            self.input.drain(..PREFACE.len());
            self.phase = Phase::Frames;
        }
        let mut at = 0;
        while self.input.len() - at >= FRAME_HEADER {
            let h = &self.input[at..at + FRAME_HEADER];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if self.input.len() - at < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let end = at + FRAME_HEADER + len;
            let frame = std::mem::take(&mut self.input);
            let r = self.frame(kind, flags, stream, &frame[at..end]);
            self.input = frame;
            r?;
            at = end;
        }
        self.input.drain(..at);
        Ok(())
    }

    /// Bytes ready for the server, oldest first.
    pub fn ready(&self) -> &[u8] {
        &self.output[self.taken..]
    }

    /// `n` bytes of [`Rewriter::ready`] were passed on.
    pub fn consume(&mut self, n: usize) {
        self.taken = (self.taken + n).min(self.output.len());
        if self.taken == self.output.len() {
            self.output.clear();
            self.taken = 0;
        }
    }

    /// Nothing is waiting to be passed on.
    pub fn is_drained(&self) -> bool {
        self.ready().is_empty()
    }

    fn passthrough(&self) -> bool {
        matches!(self.phase, Phase::Passthrough)
    }

    /// One whole frame (header included).
    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        frame: &[u8],
    ) -> Result<(), RewriteError> {
        let payload = &frame[FRAME_HEADER..];
        match kind {
            HEADERS => {
                if let Some(p) = &self.pending {
                    return Err(RewriteError::Interleaved(kind, p.stream));
                }
                let mut from = 0;
                let mut to = payload.len();
                if flags & PADDED != 0 {
                    let pad = usize::from(*payload.first().ok_or(RewriteError::Malformed(stream))?);
                    from = 1;
                    to = to
                        .checked_sub(pad)
                        .filter(|&t| t >= from)
                        .ok_or(RewriteError::Malformed(stream))?;
                }
                let priority = if flags & PRIORITY != 0 {
                    let p: [u8; 5] = payload
                        .get(from..from + 5)
                        .filter(|_| from + 5 <= to)
                        .and_then(|s| s.try_into().ok())
                        .ok_or(RewriteError::Malformed(stream))?;
                    from += 5;
                    Some(p)
                } else {
                    None
                };
                self.pending = Some(Pending {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    block: payload[from..to].to_vec(),
                });
                if flags & END_HEADERS != 0 {
                    self.finish_block()?;
                }
            }
            CONTINUATION if self.pending.as_ref().is_some_and(|p| p.stream == stream) => {
                let p = self
                    .pending
                    .as_mut()
                    .ok_or(RewriteError::Malformed(stream))?;
                if p.block.len() + payload.len() > MAX_BLOCK {
                    return Err(RewriteError::TooLarge(stream));
                }
                p.block.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    self.finish_block()?;
                }
            }
            _ => {
                if let Some(p) = &self.pending {
                    return Err(RewriteError::Interleaved(kind, p.stream));
                }
                self.output.extend_from_slice(frame);
            }
        }
        Ok(())
    }

    /// Decode the pending block, mend its authority, and queue it again.
    fn finish_block(&mut self) -> Result<(), RewriteError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&p.block, |n, v| {
                fields.push((n.into_owned(), v.into_owned()))
            })
            .map_err(RewriteError::Hpack)?;
        let mut block = Vec::with_capacity(p.block.len() + 64);
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority" && !valid_authority(value) {
                self.replaced += 1;
                tracing::debug!(
                    authority = %String::from_utf8_lossy(value),
                    "HTTP/2 :authority is not a URI authority; serving it as {REPLACEMENT}"
                );
                REPLACEMENT.as_bytes()
            } else {
                value
            };
            // Literal Header Field without Indexing, new name (RFC 7541, 6.2.2).
            block.push(0);
            put_string(&mut block, name);
            put_string(&mut block, value);
        }
        let head_room = if p.priority.is_some() { 5 } else { 0 };
        let mut chunks = block.chunks(MAX_FRAME - head_room).peekable();
        let mut first = true;
        // An empty block still needs its one HEADERS frame.
        let empty: &[u8] = &[];
        let mut next = chunks.next().or(Some(empty));
        while let Some(chunk) = next {
            next = chunks.next();
            let last = next.is_none();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if first { HEADERS } else { CONTINUATION };
            let mut body = Vec::with_capacity(chunk.len() + head_room);
            if first {
                if p.end_stream {
                    flags |= END_STREAM;
                }
                if let Some(pr) = p.priority {
                    flags |= PRIORITY;
                    body.extend_from_slice(&pr);
                }
            }
            body.extend_from_slice(chunk);
            put_frame(&mut self.output, kind, flags, p.stream, &body);
            first = false;
        }
        Ok(())
    }
}

/// Would `h2` take this `:authority`?
fn valid_authority(v: &[u8]) -> bool {
    !v.is_empty() && http::uri::Authority::try_from(v).is_ok()
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
fn put_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// An HPACK string literal, not Huffman-coded.
fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    put_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, body: &[u8]) {
    let len = body.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(body);
}

/// A connection whose client-to-server bytes go through a [`Rewriter`].
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    buf: Box<[u8]>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    /// Wrap an accepted connection.
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::default(),
            buf: vec![0u8; 16 * 1024].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.rewriter.is_drained() {
                let ready = this.rewriter.ready();
                let n = ready.len().min(out.remaining());
                out.put_slice(&ready[..n]);
                this.rewriter.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.passthrough() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            this.rewriter.feed(&this.buf[..n])?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Rewriter {
        fn take_all(&mut self) -> Vec<u8> {
            let v = self.ready().to_vec();
            self.consume(v.len());
            v
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_frame(&mut v, kind, flags, stream, body);
        v
    }

    /// Split `bytes` into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    /// Decode every header block in `frames` with a fresh decoder, as the server would.
    fn server_view(fs: &[(u8, u8, u32, Vec<u8>)]) -> Vec<Vec<(String, String)>> {
        let mut d = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut cur = Vec::new();
        for (kind, flags, _, payload) in fs {
            match *kind {
                HEADERS => {
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    cur.extend_from_slice(&payload[skip..]);
                }
                CONTINUATION => cur.extend_from_slice(payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                let h = d.decode(&cur).unwrap();
                blocks.push(
                    h.into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
                cur.clear();
            }
        }
        blocks
    }

    fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method".as_slice(), b"POST".to_vec()),
            (b":scheme".as_slice(), b"http".to_vec()),
            (b":path".as_slice(), b"/forkd.v1.Forkd/NodeInfo".to_vec()),
            (b":authority".as_slice(), authority.as_bytes().to_vec()),
            (b"content-type".as_slice(), b"application/grpc".to_vec()),
        ]
    }

    fn encode(e: &mut loona_hpack::Encoder, h: &[(&'static [u8], Vec<u8>)]) -> Vec<u8> {
        e.encode(h.iter().map(|(n, v)| (*n, v.as_slice())))
    }

    #[test]
    fn a_percent_encoded_socket_path_becomes_localhost_and_the_rest_is_kept() {
        // As gRPC C core encodes it: :path and :authority literal with
        // incremental indexing, then indexed from the dynamic table.
        let mut b1 = vec![0x83, 0x86]; // :method POST, :scheme http (static)
        b1.push(0x44); // :path, indexed name 4, value literal, into the table
        put_string(&mut b1, b"/forkd.v1.Forkd/NodeInfo");
        b1.push(0x41); // :authority, indexed name 1, value literal, into the table
        put_string(&mut b1, b"tmp%2Fforkd%2Fforkd.sock");
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        wire.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        wire.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        // The second request refers to the first's fields in the client's
        // dynamic table: the rewriter must have decoded the first in step.
        let b2 = [0x83, 0x86, 0x80 | 63, 0x80 | 62];
        wire.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2));
        let mut client = loona_hpack::Encoder::new();
        let ok = encode(&mut client, &request("127.0.0.1:7070"));
        wire.extend(frame(HEADERS, END_HEADERS, 5, &ok));

        // Fed one byte at a time: nothing depends on read boundaries.
        let mut r = Rewriter::default();
        for b in &wire {
            r.feed(std::slice::from_ref(b)).unwrap();
        }
        let out = r.take_all();
        assert!(out.starts_with(PREFACE));
        let fs = frames(&out[PREFACE.len()..]);
        assert_eq!(fs.len(), 5);
        assert_eq!(
            (fs[0].0, fs[2].0),
            (0x4, 0x0),
            "other frames pass unchanged"
        );
        assert_eq!(fs[2].3, b"\0\0\0\0\0");
        assert_eq!(fs[3].1, END_HEADERS | END_STREAM, "flags kept");
        let blocks = server_view(&fs);
        assert_eq!(blocks.len(), 3);
        for b in &blocks[..2] {
            assert!(
                b.contains(&(":authority".into(), "localhost".into())),
                "{b:?}"
            );
            assert!(b.contains(&(":path".into(), "/forkd.v1.Forkd/NodeInfo".into())));
        }
        assert!(blocks[2].contains(&(":authority".into(), "127.0.0.1:7070".into())));
        assert_eq!(r.replaced, 2);
    }

    #[test]
    fn padding_priority_and_continuations_are_understood() {
        let mut client = loona_hpack::Encoder::new();
        let mut headers = request("%2Frun%2Fx.sock");
        // A large header: the rewritten block needs CONTINUATION frames.
        headers.push((b"x-big".as_slice(), vec![b'a'; 40_000]));
        let block = encode(&mut client, &headers);
        let (a, rest) = block.split_at(100);
        let mut body = vec![3u8]; // pad length
        body.extend_from_slice(&[0x80, 0, 0, 0, 16]); // exclusive, depends on 0, weight 16
        body.extend_from_slice(a);
        body.extend_from_slice(&[0, 0, 0]);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 7, &body));
        let (b, c) = rest.split_at(rest.len() / 2);
        wire.extend(frame(CONTINUATION, 0, 7, b));
        wire.extend(frame(CONTINUATION, END_HEADERS, 7, c));
        let mut r = Rewriter::default();
        r.feed(&wire).unwrap();
        let out = r.take_all();
        let fs = frames(&out[PREFACE.len()..]);
        assert!(fs.len() >= 3, "split again into frames of at most 16 KiB");
        assert!(fs.iter().all(|f| f.3.len() <= MAX_FRAME && f.2 == 7));
        assert_eq!(
            fs[0].1,
            PRIORITY | END_STREAM,
            "padding dropped, priority kept"
        );
        assert_eq!(&fs[0].3[..5], &[0x80, 0, 0, 0, 16]);
        assert_eq!(fs.last().unwrap().1, END_HEADERS);
        let blocks = server_view(&fs);
        assert!(blocks[0].contains(&(":authority".into(), "localhost".into())));
        assert!(blocks[0].contains(&("x-big".into(), "a".repeat(40_000))));
    }

    #[test]
    fn http1_and_bad_frames() {
        let mut r = Rewriter::default();
        r.feed(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.take_all(), b"GET / HTTP/1.1\r\n\r\n");
        assert!(r.passthrough());

        let mut r = Rewriter::default();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 1, 2]));
        assert!(matches!(r.feed(&wire), Err(RewriteError::Malformed(1))));

        let mut r = Rewriter::default();
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, 0, 1, &[0x82]));
        wire.extend(frame(0x0, 0, 1, b"x"));
        assert!(matches!(
            r.feed(&wire),
            Err(RewriteError::Interleaved(0, 1))
        ));
    }

    #[test]
    fn hpack_integers() {
        let mut v = Vec::new();
        put_int(&mut v, 0, 7, 10);
        put_int(&mut v, 0, 7, 127);
        put_int(&mut v, 0, 7, 1337);
        assert_eq!(v, [10, 127, 0, 127, 0xba, 0x09]);
        assert!(valid_authority(b"localhost") && valid_authority(b"10.0.0.1:7070"));
        assert!(!valid_authority(b"tmp%2Fsock") && !valid_authority(b""));
    }
}
