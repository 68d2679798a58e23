//! A `/proc` file line by line, through the caller's fixed buffer and up to a cap on the
//! bytes read: no allocation, and a bounded cost whatever the file holds.

use std::path::Path;

use rustix::{
    fs::{Mode, OFlags},
    io::Errno,
};

/// How a read went, beyond the lines it passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Bytes read.
    pub bytes: usize,
    /// Lines longer than the buffer, skipped unseen.
    pub too_long: usize,
    /// The cap was reached: what followed was not read, and the line it cut was dropped.
    pub capped: bool,
}

/// Calls `line` with each complete line of `path`, without its `\n`, reading through
/// `buf` and at most `cap` bytes in all.
///
/// A last line without `\n` at the end of the file is complete; a line longer than `buf`
/// is skipped whole, and so is the line the cap cuts, so `line` never sees a fragment.
/// Fails only when the file cannot be opened or a read fails (e.g. `EOPNOTSUPP` from a
/// PSI file of a kernel booted with `psi=0`); then some lines may have been passed on.
pub fn for_each_line(
    path: &Path,
    buf: &mut [u8],
    cap: usize,
    mut line: impl FnMut(&[u8]),
) -> Result<Summary, Errno> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut summary = Summary::default();
    // `buf[..kept]` holds the start of a line whose end has not been read yet.
    let mut kept = 0;
    let mut skipping = false;
    loop {
        let want = (buf.len() - kept).min(cap - summary.bytes);
        if want == 0 {
            if summary.bytes >= cap {
                summary.capped = true;
                return Ok(summary);
            }
            // The buffer is full and holds no line end: skip to the next one.
            summary.too_long += 1;
            skipping = true;
            kept = 0;
            continue;
        }
        let n = read(&fd, &mut buf[kept..kept + want])?;
        if n == 0 {
            if kept > 0 {
                line(&buf[..kept]);
            }
            return Ok(summary);
        }
        summary.bytes += n;
        let end = kept + n;
        let mut start = 0;
        let mut from = kept;
        while let Some(at) = buf[from..end].iter().position(|&b| b == b'\n') {
            let nl = from + at;
            if skipping {
                skipping = false;
            } else {
                line(&buf[start..nl]);
            }
            start = nl + 1;
            from = start;
        }
        kept = if skipping { 0 } else { end - start };
        buf.copy_within(start..start + kept, 0);
    }
}

/// One `read`, again if a signal interrupted it.
fn read(fd: &impl rustix::fd::AsFd, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[u8], buf_len: usize, cap: usize) -> (Vec<String>, Summary) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, text).expect("write");
        let mut buf = vec![0u8; buf_len];
        let mut seen = Vec::new();
        let summary = for_each_line(&path, &mut buf, cap, |l| {
            seen.push(String::from_utf8_lossy(l).into_owned());
        })
        .expect("read");
        (seen, summary)
    }

    #[test]
    fn lines_across_reads_and_a_last_line_without_newline() {
        let text = b"a 1\nbb 22\n\nccc 333\nlast";
        for buf_len in [8, 9, 10, 64] {
            let (seen, summary) = lines(text, buf_len, 1024);
            assert_eq!(seen, ["a 1", "bb 22", "", "ccc 333", "last"], "{buf_len}");
            assert_eq!(summary.bytes, text.len());
            assert_eq!((summary.too_long, summary.capped), (0, false));
        }
    }

    #[test]
    fn too_long_lines_are_skipped_whole() {
        let long = "x".repeat(100);
        let text = format!("a 1\n{long}\nb 2\n{long}{long}\nc 3\n{long}");
        let (seen, summary) = lines(text.as_bytes(), 16, 1 << 20);
        assert_eq!(seen, ["a 1", "b 2", "c 3"]);
        assert_eq!(summary.too_long, 3);
        assert!(!summary.capped);
    }

    #[test]
    fn the_cap_stops_reading_and_drops_the_line_it_cuts() {
        let text = b"a 1\nb 2\nc 3\nd 4\n";
        let (seen, summary) = lines(text, 64, 10);
        assert_eq!(seen, ["a 1", "b 2"], "\"c \" was cut");
        assert_eq!((summary.bytes, summary.capped), (10, true));
    }

    #[test]
    fn a_missing_file_or_a_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut buf = [0u8; 16];
        let missing = for_each_line(&dir.path().join("nope"), &mut buf, 64, |_| {});
        assert_eq!(missing, Err(Errno::NOENT));
        let is_dir = for_each_line(dir.path(), &mut buf, 64, |_| {});
        assert_eq!(is_dir, Err(Errno::ISDIR));
    }
}
