//! A plain tokio implementation of the RAAS protocol, as a yardstick for raasd: the
//! obvious multi-threaded async server (one task per connection, buffered reads by
//! line, buffered writes flushed whenever the input buffer is drained), reversing
//! with the same `raasd::codec::reverse_into` by graphemes.
//!
//! `cargo run --release --example tokio_baseline -- 127.0.0.1:PORT` (port 0 picks a
//! free one); prints `listening on ADDR` to stderr. Same rules as raasd: a trailing
//! `\r` is stripped and the reply ends in `\r\n`, a last line without `\n` is
//! answered, and a line over 65536 bytes gets `ERR line too long (max 65536 bytes)`
//! and the connection is closed.

use std::io;

use raasd::codec::{Unit, reverse_into};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

const MAX_LINE: usize = 65536;

#[tokio::main]
async fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:2200".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            // A client that resets or disappears is its own business.
            let _ = serve(stream).await;
        });
    }
}

async fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::new(writer);
    let mut line = Vec::new();
    let mut reply = Vec::new();
    loop {
        line.clear();
        // The limit keeps a line without "\n" from growing without bound: one byte
        // over the longest line and its "\r\n" is enough to know it is too long.
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 2)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            writer.flush().await?;
            return Ok(());
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let (body, end): (&[u8], &[u8]) = match body.strip_suffix(b"\r") {
            Some(b) => (b, b"\r\n"),
            None => (body, b"\n"),
        };
        if body.len() + usize::from(end.len() == 2) > MAX_LINE {
            writer
                .write_all(format!("ERR line too long (max {MAX_LINE} bytes)\n").as_bytes())
                .await?;
            writer.flush().await?;
            return Ok(());
        }
        reply.clear();
        reverse_into(body, Unit::Graphemes, &mut reply);
        reply.extend_from_slice(end);
        writer.write_all(&reply).await?;
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}
