//! The 9P2000.L wire format: little-endian integers, strings as a u16 length and bytes, and a
//! header `size[4] type[1] tag[2]` on every message. Decoding never trusts a length: every read
//! is bounded by the bytes actually present.

/// Message types (Linux `include/net/9p/9p.h`). Each R-message is its T-message plus one.
pub const RLERROR: u8 = 7;
pub const TSTATFS: u8 = 8;
pub const TLOPEN: u8 = 12;
pub const TLCREATE: u8 = 14;
pub const TSYMLINK: u8 = 16;
pub const TMKNOD: u8 = 18;
pub const TRENAME: u8 = 20;
pub const TREADLINK: u8 = 22;
pub const TGETATTR: u8 = 24;
pub const TSETATTR: u8 = 26;
pub const TXATTRWALK: u8 = 30;
pub const TXATTRCREATE: u8 = 32;
pub const TREADDIR: u8 = 40;
pub const TFSYNC: u8 = 50;
pub const TLOCK: u8 = 52;
pub const TGETLOCK: u8 = 54;
pub const TLINK: u8 = 70;
pub const TMKDIR: u8 = 72;
pub const TRENAMEAT: u8 = 74;
pub const TUNLINKAT: u8 = 76;
pub const TVERSION: u8 = 100;
pub const TATTACH: u8 = 104;
pub const TFLUSH: u8 = 108;
pub const TWALK: u8 = 110;
pub const TREAD: u8 = 116;
pub const TWRITE: u8 = 118;
pub const TCLUNK: u8 = 120;
pub const TREMOVE: u8 = 122;

/// `size[4] type[1] tag[2]`.
pub const HEADER_SIZE: usize = 7;
/// The header plus `count[4]` of Rread/Rreaddir: what a reply adds around its data.
pub const IO_HEADER_SIZE: usize = HEADER_SIZE + 4;
/// Encoded size of a qid: `type[1] version[4] path[8]`.
pub const QID_SIZE: usize = 13;

/// The message ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// A file's identity on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

/// Reads fields off a message body.
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], Truncated> {
        if len > self.buf.len() {
            return Err(Truncated);
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_le_bytes)
    }

    /// A string's raw bytes (9P strings are not NUL-terminated; callers check the content).
    pub fn string(&mut self) -> Result<&'a [u8], Truncated> {
        let len = self.u16()?;
        self.bytes(usize::from(len))
    }
}

/// Appends fields to a reply whose header is filled in by [`Encoder::finish`].
pub struct Encoder<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Encoder<'a> {
    /// Starts a reply of type `kind` with `tag` in `buf`, which it clears.
    pub fn new(buf: &'a mut Vec<u8>, kind: u8, tag: u16) -> Self {
        buf.clear();
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        buf.extend_from_slice(&tag.to_le_bytes());
        Self { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A string; callers keep it under 64 KiB (names and link targets are under PATH_MAX).
    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        self.u16(len);
        self.buf.extend_from_slice(&s[..usize::from(len)]);
        self
    }

    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        self
    }

    pub fn qid(&mut self, qid: Qid) -> &mut Self {
        self.u8(qid.kind).u32(qid.version).u64(qid.path)
    }

    /// The buffer, for replies that read data straight into it.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        self.buf
    }

    /// Writes the size field.
    pub fn finish(self) {
        let size = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&size.to_le_bytes());
    }
}

/// `Rlerror`: `ecode[4]`.
pub fn encode_error(buf: &mut Vec<u8>, tag: u16, errno: i32) {
    let mut enc = Encoder::new(buf, RLERROR, tag);
    enc.u32(errno.unsigned_abs());
    enc.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_refuses_to_read_past_the_end() {
        let mut dec = Decoder::new(&[1, 0, 0xff]);
        assert_eq!(dec.u16(), Ok(1));
        assert_eq!(dec.u16(), Err(Truncated));
        assert_eq!(dec.u8(), Ok(0xff));
        // A string whose length claims more than is there.
        let mut dec = Decoder::new(&[5, 0, b'a', b'b']);
        assert_eq!(dec.string(), Err(Truncated));
    }

    #[test]
    fn encoder_fills_the_header() {
        let mut buf = vec![9; 3];
        let mut enc = Encoder::new(&mut buf, RLERROR + 100, 0x1234);
        enc.u32(7).string(b"ab");
        enc.finish();
        assert_eq!(
            buf,
            [15, 0, 0, 0, 107, 0x34, 0x12, 7, 0, 0, 0, 2, 0, b'a', b'b']
        );
    }
}
