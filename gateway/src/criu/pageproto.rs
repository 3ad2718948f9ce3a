//! CRIU's page-server protocol (criu/page-xfer.c), the part post-copy uses: a
//! `criu lazy-pages` daemon sends `GET` for a run of one process's pages and expects, in
//! request order, an `ADD_F` header echoing the request (its page count possibly smaller,
//! never zero) followed by exactly that many pages; it ends with `CLOSE`, answered by a
//! 32-bit zero. A header is 32 bytes in host order: u32 command (low 16 bits; flags in the
//! high 16), 4 bytes of padding, u64 page count, u64 address, u64 destination id (for a
//! `GET`, the process's virtual pid).

/// A GET: the daemon asks for pages.
pub const CMD_GET: u32 = 7;
/// The answer to a GET (and a dump's push): pages follow when flagged present.
pub const CMD_ADD_F: u32 = 6;
/// The client is done.
pub const CMD_CLOSE: u32 = 0x1023;
/// The client is done, without flushing.
pub const CMD_FORCE_CLOSE: u32 = 0x1024;
/// "Pages present" (PE_PRESENT), in the command's flag bits.
const FLAG_PRESENT: u32 = 1 << 2;

/// Size of a header on the wire.
pub const HEADER_LEN: usize = 32;

/// One protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Header {
    /// The command without its flags.
    pub fn command(&self) -> u32 {
        self.cmd & 0xffff
    }

    /// A GET for `nr_pages` pages of process `pid` from `vaddr`.
    pub fn get(pid: u32, vaddr: u64, nr_pages: u64) -> Self {
        Self {
            cmd: CMD_GET,
            nr_pages,
            vaddr,
            dst_id: u64::from(pid),
        }
    }

    /// The answer to this GET carrying `nr_pages` pages.
    pub fn reply(&self, nr_pages: u64) -> Self {
        Self {
            cmd: CMD_ADD_F | (FLAG_PRESENT << 16),
            nr_pages,
            vaddr: self.vaddr,
            dst_id: self.dst_id,
        }
    }

    pub fn close() -> Self {
        Self {
            cmd: CMD_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_ne_bytes(x)
        };
        let mut cmd = [0u8; 4];
        cmd.copy_from_slice(&b[0..4]);
        Self {
            cmd: u32::from_ne_bytes(cmd),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_and_its_reply_round_trip_as_criu_lays_them_out() {
        let get = Header::get(7, 0x7f00_0000_1000, 16);
        let bytes = get.encode();
        assert_eq!(&bytes[0..4], &7u32.to_ne_bytes());
        assert_eq!(&bytes[4..8], &[0, 0, 0, 0], "padding");
        assert_eq!(Header::decode(&bytes), get);
        let reply = get.reply(3);
        assert_eq!(reply.cmd, 0x0004_0006);
        assert_eq!(reply.command(), CMD_ADD_F);
        assert_eq!(
            (reply.vaddr, reply.dst_id, reply.nr_pages),
            (get.vaddr, 7, 3)
        );
        assert_eq!(Header::close().command(), CMD_CLOSE);
    }
}
