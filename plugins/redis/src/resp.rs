//! A minimal Redis client over a TCP connection the site grants (`sockets`): one command,
//! its reply as `redis-cli` would print it without a terminal. The switch runs a handful of
//! commands against the local instance while clients wait; `redis-cli` costs ~5 ms to
//! start each time, a connection here a fraction of a millisecond.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};

/// Why a command got no reply.
#[derive(Debug)]
pub enum RespError {
    /// No connection (not granted, or nothing listening): nothing was sent.
    Connect(std::io::Error),
    /// Sent, or maybe sent: the outcome is unknown.
    Io(std::io::Error),
    /// The server answered with an error reply.
    Server(String),
    /// Not a reply this client understands.
    Protocol(String),
}

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RespError::Connect(e) => write!(f, "cannot connect: {e}"),
            RespError::Io(e) => write!(f, "connection failed: {e}"),
            RespError::Server(e) => write!(f, "{e}"),
            RespError::Protocol(e) => write!(f, "unexpected reply: {e}"),
        }
    }
}

/// Runs `args` as one command at `addr`.
pub fn command(addr: SocketAddr, args: &[&str]) -> Result<String, RespError> {
    let mut stream = TcpStream::connect(addr).map_err(RespError::Connect)?;
    stream.write_all(&encode(args)).map_err(RespError::Io)?;
    let mut reader = BufReader::new(stream);
    read_reply(&mut reader)
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One reply, as text: a status or a bulk string as is, an integer in decimal, an array's
/// elements one per line (a nil as an empty line).
pub fn read_reply(r: &mut impl BufRead) -> Result<String, RespError> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(RespError::Io)?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || -> Result<i64, RespError> {
        rest.parse()
            .map_err(|_| RespError::Protocol(format!("{line:?}")))
    };
    match kind {
        "+" => Ok(rest.to_string()),
        "-" => Err(RespError::Server(rest.to_string())),
        ":" => Ok(rest.to_string()),
        "$" => {
            let n = number()?;
            if n < 0 {
                return Ok(String::new());
            }
            let mut body = vec![0u8; n as usize + 2];
            r.read_exact(&mut body).map_err(RespError::Io)?;
            body.truncate(n as usize);
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        "*" => {
            let n = number()?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_reply(r)?);
            }
            Ok(items.join("\n"))
        }
        _ => Err(RespError::Protocol(format!("{line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> Result<String, RespError> {
        read_reply(&mut std::io::Cursor::new(bytes.to_vec()))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            encode(&["CLIENT", "PAUSE", "10000"]),
            b"*3\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$5\r\n10000\r\n".to_vec()
        );
    }

    #[test]
    fn replies_read_as_redis_cli_prints_them() {
        assert_eq!(reply(b"+OK\r\n").unwrap(), "OK");
        assert_eq!(reply(b":42\r\n").unwrap(), "42");
        assert_eq!(
            reply(b"$25\r\n# Replication\r\nrole:slave\r\n").unwrap(),
            "# Replication\r\nrole:slave"
        );
        assert_eq!(reply(b"$-1\r\n").unwrap(), "");
        assert_eq!(
            reply(b"*2\r\n$24\r\nrepl-diskless-sync-delay\r\n$1\r\n5\r\n").unwrap(),
            "repl-diskless-sync-delay\n5"
        );
        assert!(matches!(reply(b"-ERR nope\r\n"), Err(RespError::Server(e)) if e == "ERR nope"));
        assert!(matches!(reply(b"?\r\n"), Err(RespError::Protocol(_))));
        assert!(matches!(reply(b"$5\r\nab"), Err(RespError::Io(_))));
    }
}
